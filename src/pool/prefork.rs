//! The prefork pool: N child processes of this same binary, each with its
//! tasks initialised once, supervised by the parent.
//!
//! Why processes: a panic can be caught in a thread, but an abort or a
//! segfault inside native code (pdfium, ONNX Runtime) kills the process it
//! happens in, and a loop that never checks its cancel flag can only be
//! stopped by killing its process. Here the parent owns every Redis
//! connection; a child only computes. When a child dies, only its task is
//! affected: the parent reports it and starts a replacement.
//!
//! One supervisor task per child slot. It owns the child, its pipes, and
//! the limits of the job it runs: soft limit → SIGUSR1; hard limit
//! or memory cap → SIGKILL; exit or signal → `WorkerLost`. A supervisor
//! that is respawning still accepts work: the job waits for the new child.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::BufReader;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::ipc::{encode_frame, read_frame_async, FromChild, ToChildRef};
use super::{Job, JobOutcome, Pool, Slot};
use crate::redis_link::Backoff;

#[derive(Debug, Clone)]
pub struct PreforkConfig {
    pub size: usize,
    /// The binary to start (this one) and its arguments for child mode.
    pub exe: PathBuf,
    pub child_args: Vec<String>,
    pub max_tasks_per_child: Option<u64>,
    pub max_memory_kib: Option<u64>,
    /// The longest a job may hold its process when it has no hard time
    /// limit (`--job-watchdog`); `None` for never.
    pub job_watchdog: Option<Duration>,
}

/// How long past its hard time limit a job may hold its process before the
/// watchdog recovers it: the supervisor's own limit handling (a kill and a
/// wait) should have ended it well within this.
const WATCHDOG_GRACE: Duration = Duration::from_secs(10);

/// How long a child whose frames stopped (end of stream) may take to exit
/// before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Longest wait for a killed child to be reaped; a process stuck in the
/// kernel must not hold the supervisor.
const REAP_WAIT: Duration = Duration::from_secs(5);

struct Dispatch {
    job: Job,
    slot: Slot,
    reply: oneshot::Sender<JobOutcome>,
}

/// Why children were replaced, for logs, `inspect stats` and metrics.
#[derive(Debug, Default)]
pub struct RestartCounts(Mutex<BTreeMap<&'static str, u64>>);

impl RestartCounts {
    fn add(&self, cause: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cause)
            .or_default() += 1;
    }
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Shared {
    /// Cold shutdown: every supervisor kills its child.
    abort: tokio_util::sync::CancellationToken,
    pids: Mutex<Vec<Option<u32>>>,
    idle: Mutex<VecDeque<usize>>,
    restarts: RestartCounts,
    /// Bumped by `pool_restart`: a process started before the bump is
    /// replaced when idle, or once its current task is done.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn set_pid(&self, index: usize, pid: Option<u32>) {
        self.pids.lock().unwrap_or_else(|p| p.into_inner())[index] = pid;
    }
    fn push_idle(&self, index: usize) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(index);
    }
}

pub struct PreforkPool {
    cfg: PreforkConfig,
    size: std::sync::atomic::AtomicUsize,
    slots: Arc<Semaphore>,
    /// One per supervisor ever started; `None` once shrunk away.
    senders: Mutex<Vec<Option<mpsc::UnboundedSender<Dispatch>>>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PreforkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreforkPool")
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

impl PreforkPool {
    /// Starts the supervisors; children start in the background.
    pub fn start(cfg: PreforkConfig) -> Self {
        let size = cfg.size.max(1);
        let pool = Self {
            cfg,
            size: 0.into(),
            slots: Arc::new(Semaphore::new(0)),
            senders: Mutex::new(Vec::new()),
            shared: Arc::new(Shared {
                abort: tokio_util::sync::CancellationToken::new(),
                pids: Mutex::new(Vec::new()),
                idle: Mutex::new(VecDeque::new()),
                restarts: RestartCounts::default(),
                generation: tokio::sync::watch::Sender::new(0),
            }),
        };
        pool.grow(size);
        pool
    }

    /// Starts one more supervisor (and its child) and opens its slot.
    fn add_supervisor(&self) {
        let (tx, rx) = mpsc::unbounded_channel();
        let index = {
            let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
            senders.push(Some(tx));
            senders.len() - 1
        };
        self.shared
            .pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(None);
        self.shared.push_idle(index);
        tokio::spawn(supervise(index, self.cfg.clone(), rx, self.shared.clone()));
        self.size.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.slots.add_permits(1);
    }
}

impl Pool for PreforkPool {
    fn kind(&self) -> &'static str {
        "prefork"
    }

    fn size(&self) -> usize {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn grow(&self, n: usize) {
        for _ in 0..n {
            self.add_supervisor();
        }
    }

    /// Takes a free slot for good, then retires an idle supervisor: its
    /// child finishes nothing (it is idle) and exits.
    fn shrink(
        &self,
        n: usize,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            for _ in 0..n {
                if self.size() <= 1 {
                    return Err("cannot shrink the pool below one process".into());
                }
                self.size.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                super::retire_slot(&self.slots).await?;
                let index = self
                    .shared
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_back()
                    .ok_or("no idle process to retire")?;
                // Dropping the sender ends that supervisor's loop.
                self.senders.lock().unwrap_or_else(|p| p.into_inner())[index] = None;
            }
            Ok(())
        })
    }

    fn acquire(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Slot> + Send + '_>> {
        super::acquire_slot(&self.slots)
    }

    fn restart(&self) -> Result<(), String> {
        self.shared.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    fn run(&self, slot: Slot, job: Job) -> oneshot::Receiver<JobOutcome> {
        let (reply, rx) = oneshot::channel();
        // A slot guarantees an idle supervisor: each one gives its place
        // back before it releases the slot of the job it finished.
        let index = self
            .shared
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .expect("a held slot implies an idle supervisor");
        let sender = self.senders.lock().unwrap_or_else(|p| p.into_inner())[index].clone();
        // Known now, so `inspect active` can name the process at once; the
        // supervisor corrects it if it has to respawn first, and tells
        // STARTED (`Job::handed_to`) which process really got the job.
        if let Some(pid) = self.shared.pids.lock().unwrap_or_else(|p| p.into_inner())[index] {
            job.pid.store(pid, std::sync::atomic::Ordering::Relaxed);
        }
        let dispatch = Dispatch { job, slot, reply };
        let refused = match sender {
            Some(tx) => tx.send(dispatch).err().map(|e| e.0),
            None => Some(dispatch),
        };
        if let Some(d) = refused {
            let _ = d
                .reply
                .send(JobOutcome::WorkerLost("the pool is shutting down".into()));
        }
        rx
    }

    fn restarts(&self) -> BTreeMap<&'static str, u64> {
        self.shared.restarts.snapshot()
    }

    fn abort(&self) {
        self.shared.abort.cancel();
    }

    fn pids(&self) -> Vec<u32> {
        self.shared
            .pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .copied()
            .collect()
    }
}

/// "signal 11 (SIGSEGV)" or "exit code 3", for error messages.
fn describe_exit(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (_, Some(sig)) => format!("signal {sig} ({})", signal_name(sig)),
            (Some(code), None) => format!("exit code {code}"),
            _ => "unknown status".into(),
        },
        None => "unknown status".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// Resident set size of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * (rustix::param::page_size() as u64) / 1024)
}

struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Frames from the child; an `Err` is the last item, saying why its
    /// stream could not be read on (the reader stops there).
    frames: mpsc::UnboundedReceiver<Result<FromChild, String>>,
    pid: u32,
}

async fn spawn_child(cfg: &PreforkConfig) -> std::io::Result<Running> {
    let mut child = Command::new(&cfg.exe)
        .args(&cfg.child_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0);
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, mut frames) = mpsc::unbounded_channel();
    // Reading a frame is not cancel-safe, so one task owns the reader and
    // the supervisor selects on the channel instead.
    // A frame that cannot be read ends the reader, but never silently: the
    // supervisor is told why and ends the job (a reader that just stopped
    // once left a live, idle child holding its slot for ever).
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout);
        loop {
            match read_frame_async::<FromChild>(&mut reader).await {
                Ok(Some(frame)) => {
                    if tx.send(Ok(frame)).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                // A frame read whole that is not understood: the child is
                // alive and its reply unreadable.
                Err(e @ super::ipc::FrameError::Unreadable { .. }) => {
                    let _ = tx.send(Err(e.to_string()));
                    break;
                }
                // The pipe broke or the length is absurd: the stream ends
                // here, and the child's exit status says why (a child
                // killed while writing a large reply is lost, not a
                // result that could not be encoded).
                Err(_) => break,
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(300), frames.recv()).await {
        Ok(Some(Ok(FromChild::Ready { .. }))) => Ok(Running {
            child,
            stdin,
            frames,
            pid,
        }),
        Ok(Some(other)) => {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
            Err(std::io::Error::other(format!(
                "child {pid} sent {other:?} instead of Ready during initialisation; killed"
            )))
        }
        Ok(None) => {
            let status = reap(&mut child, EXIT_GRACE).await;
            Err(std::io::Error::other(format!(
                "child {pid} exited during initialisation ({})",
                describe_exit(status)
            )))
        }
        Err(_) => Err(std::io::Error::other(format!(
            "child {pid} did not initialise within 300 s"
        ))),
    }
}

/// How a job ended, plus whether the child must be replaced and why.
struct JobEnd {
    outcome: JobOutcome,
    replace: Option<&'static str>,
}

async fn supervise(
    index: usize,
    cfg: PreforkConfig,
    mut jobs: mpsc::UnboundedReceiver<Dispatch>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::default();
    let mut pending: Option<Dispatch> = None;
    let mut generation = shared.generation.subscribe();
    'spawn: loop {
        // A process started now is already what a restart asks for.
        generation.borrow_and_update();
        let mut running = match spawn_child(&cfg).await {
            Ok(r) => r,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(child = index, error = %e, retry_in_ms = delay.as_millis() as u64, "could not start a pool process");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        backoff.reset();
        shared.set_pid(index, Some(running.pid));
        tracing::info!(child = index, pid = running.pid, "pool process ready");
        let mut served: u64 = 0;
        loop {
            let mut dispatch = match pending.take() {
                Some(d) => d,
                None => tokio::select! {
                    d = jobs.recv() => match d {
                        Some(d) => d,
                        None => {
                            // Pool closed: let the child finish and leave.
                            drop(running.stdin.take());
                            let _ = tokio::time::timeout(Duration::from_secs(5), running.child.wait()).await;
                            shared.set_pid(index, None);
                            return;
                        }
                    },
                    status = running.child.wait() => {
                        tracing::warn!(child = index, pid = running.pid, status = %describe_exit(status.ok()), "idle pool process exited; replacing it");
                        shared.restarts.add("exited-idle");
                        shared.set_pid(index, None);
                        continue 'spawn;
                    }
                    Ok(()) = generation.changed() => {
                        tracing::info!(child = index, pid = running.pid, "idle pool process replaced by pool_restart");
                        shared.restarts.add("pool-restart");
                        shared.set_pid(index, None);
                        retire(&mut running).await;
                        continue 'spawn;
                    }
                },
            };
            let frame = encode_frame(&ToChildRef::Run {
                id: &dispatch.job.id,
                name: &dispatch.job.name,
                args: &dispatch.job.args,
                kwargs: &dispatch.job.kwargs,
                retries: dispatch.job.retries,
            });
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => {
                    // Larger than a frame may be: the child is untouched
                    // and serves the next job.
                    tracing::error!(child = index, task_id = %dispatch.job.id, task_name = %dispatch.job.name, error = %e, "job too large to hand to a pool process");
                    shared.push_idle(index);
                    let Dispatch { slot, reply, .. } = dispatch;
                    let _ = reply.send(JobOutcome::Finished {
                        result: Err(crate::pool::encode_error(format!(
                            "the job could not be handed to a pool process: {e}"
                        ))),
                        pid: running.pid,
                    });
                    drop(slot);
                    continue;
                }
            };
            let stdin = running.stdin.as_mut().expect("stdin open while serving");
            if write_all_flush(stdin, &frame).await.is_err() {
                // The child died before it got the job: the job is intact,
                // run it on the replacement.
                tracing::warn!(
                    child = index,
                    pid = running.pid,
                    "pool process gone before it received a job; replacing it"
                );
                shared.restarts.add("exited-idle");
                pending = Some(dispatch);
                kill(&mut running).await;
                shared.set_pid(index, None);
                continue 'spawn;
            }
            dispatch
                .job
                .pid
                .store(running.pid, std::sync::atomic::Ordering::Relaxed);
            if let Some(handed_to) = dispatch.job.handed_to.take() {
                let _ = handed_to.send(running.pid);
            }
            let end = watched(&cfg, &mut running, &dispatch.job, &shared.abort).await;
            dispatch
                .job
                .pid
                .store(0, std::sync::atomic::Ordering::Relaxed);
            served += 1;
            let restart_due = generation.has_changed().unwrap_or(false);
            let recycle = end.replace.is_none()
                && (restart_due || cfg.max_tasks_per_child.is_some_and(|max| served >= max));
            if end.replace.is_some() || recycle {
                // The next job here goes to a new process: never name this one.
                shared.set_pid(index, None);
            }
            // Give our place back before releasing the slot (see `run`).
            shared.push_idle(index);
            let Dispatch { slot, reply, .. } = dispatch;
            let _ = reply.send(end.outcome);
            drop(slot);
            if let Some(cause) = end.replace {
                shared.restarts.add(cause);
                shared.set_pid(index, None);
                continue 'spawn;
            }
            if recycle {
                if restart_due {
                    tracing::info!(
                        child = index,
                        pid = running.pid,
                        "pool process replaced by pool_restart after its task"
                    );
                    shared.restarts.add("pool-restart");
                } else {
                    tracing::info!(
                        child = index,
                        pid = running.pid,
                        served,
                        "pool process reached --max-tasks-per-child; replacing it"
                    );
                    shared.restarts.add("max-tasks-per-child");
                }
                retire(&mut running).await;
                shared.set_pid(index, None);
                continue 'spawn;
            }
        }
    }
}

/// Lets an idle child leave (its stdin closes), killing it if it has not
/// within 10 s.
async fn retire(running: &mut Running) {
    drop(running.stdin.take());
    if tokio::time::timeout(Duration::from_secs(10), running.child.wait())
        .await
        .is_err()
    {
        kill(running).await;
    }
}

/// Runs one job to its end, enforcing the soft limit (SIGUSR1), the
/// hard limit and the memory cap (SIGKILL), and noticing the child's death.
async fn watch_job(
    cfg: &PreforkConfig,
    running: &mut Running,
    job: &Job,
    abort: &tokio_util::sync::CancellationToken,
) -> JobEnd {
    let started = Instant::now();
    let soft_at = job.soft_limit.map(|d| started + d);
    let hard_at = job.hard_limit.map(|d| started + d);
    let mut soft_sent = false;
    let mut rss_tick = tokio::time::interval(Duration::from_millis(50));
    rss_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let sleep_until = |t: Option<Instant>| async move {
        match t {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending::<()>().await,
        }
    };
    loop {
        tokio::select! {
            frame = running.frames.recv() => match frame {
                Some(Ok(FromChild::Progress(meta))) => job.progress.progress(meta),
                Some(Ok(FromChild::Done(result))) => {
                    return JobEnd { outcome: JobOutcome::Finished { result, pid: running.pid }, replace: None };
                }
                Some(Ok(FromChild::Panicked(message))) => {
                    return JobEnd { outcome: JobOutcome::Panicked(message), replace: None };
                }
                Some(Ok(FromChild::Ready { .. })) => {}
                Some(Ok(FromChild::Unreadable(why))) => {
                    kill(running).await;
                    tracing::error!(pid = running.pid, task_id = %job.id, task_name = %job.name, error = %why, "pool process could not read its job; killed and replaced");
                    return JobEnd {
                        outcome: JobOutcome::Finished {
                            result: Err(tasks::TaskError::failed(tasks::PyException::new(
                                "kombu.exceptions",
                                "DecodeError",
                                format!("the pool process could not read the job: {why}"),
                            ))),
                            pid: running.pid,
                        },
                        replace: Some("unreadable-frame"),
                    };
                }
                Some(Err(why)) => {
                    // What the child sent cannot be read, so this job's
                    // outcome is lost with it: end the job, say why.
                    kill(running).await;
                    tracing::error!(pid = running.pid, task_id = %job.id, task_name = %job.name, error = %why, "could not read a pool process's reply; process killed and replaced");
                    return JobEnd {
                        outcome: JobOutcome::Finished {
                            result: Err(crate::pool::encode_error(format!(
                                "the task's outcome could not be carried back from its pool process: {why}"
                            ))),
                            pid: running.pid,
                        },
                        replace: Some("unreadable-frame"),
                    };
                }
                None => {
                    let status = reap(&mut running.child, EXIT_GRACE).await;
                    let how = describe_exit(status);
                    tracing::error!(pid = running.pid, status = %how, task_id = %job.id, task_name = %job.name, "pool process died while running a task; replacing it");
                    return JobEnd {
                        outcome: JobOutcome::WorkerLost(format!("Worker exited prematurely: {how} (pid {})", running.pid)),
                        replace: Some("died"),
                    };
                }
            },
            _ = sleep_until(soft_at), if !soft_sent => {
                soft_sent = true;
                if let Some(pid) = rustix::process::Pid::from_raw(running.pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::USR1);
                }
            }
            _ = sleep_until(hard_at) => {
                kill(running).await;
                tracing::error!(pid = running.pid, task_id = %job.id, task_name = %job.name, "hard time limit reached; pool process killed");
                return JobEnd {
                    outcome: JobOutcome::HardTimeLimit(job.hard_limit.unwrap_or_default()),
                    replace: Some("time-limit"),
                };
            }
            _ = abort.cancelled() => {
                kill(running).await;
                tracing::warn!(pid = running.pid, task_id = %job.id, task_name = %job.name, "cold shutdown: pool process killed");
                return JobEnd {
                    outcome: JobOutcome::WorkerLost("the worker was shut down (cold)".into()),
                    replace: Some("shutdown"),
                };
            }
            _ = job.terminate.notified() => {
                let signal = job.terminate_signal.load(std::sync::atomic::Ordering::Relaxed);
                signal_then_kill(running, signal).await;
                tracing::warn!(pid = running.pid, task_id = %job.id, task_name = %job.name, "task revoked with terminate; pool process killed");
                return JobEnd { outcome: JobOutcome::Terminated, replace: Some("terminated") };
            }
            _ = rss_tick.tick(), if cfg.max_memory_kib.is_some() => {
                let cap = cfg.max_memory_kib.unwrap_or(u64::MAX);
                if let Some(rss) = rss_kib(running.pid).filter(|rss| *rss > cap) {
                    kill(running).await;
                    tracing::error!(pid = running.pid, rss_kib = rss, cap_kib = cap, task_id = %job.id, task_name = %job.name, "memory cap exceeded; pool process killed");
                    return JobEnd {
                        outcome: JobOutcome::MemoryLimit { rss_kib: rss, cap_kib: cap },
                        replace: Some("memory-cap"),
                    };
                }
            }
        }
    }
}

/// Sends `signal` (revoke's `signal=`), then SIGKILL if the process is
/// still there a second later.
async fn signal_then_kill(running: &mut Running, signal: i32) {
    let sig = rustix::process::Signal::from_named_raw(signal);
    let pid = rustix::process::Pid::from_raw(running.pid as i32);
    if let (Some(sig), Some(pid)) = (sig, pid) {
        let _ = rustix::process::kill_process(pid, sig);
        if tokio::time::timeout(Duration::from_secs(1), running.child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    kill(running).await;
}

async fn kill(running: &mut Running) {
    let _ = running.child.start_kill();
    let _ = tokio::time::timeout(REAP_WAIT, running.child.wait()).await;
}

/// Waits up to `grace` for a child whose output ended to exit, then kills
/// it: a child that closed its stdout but lives on must not hold a slot.
async fn reap(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
        return status.ok();
    }
    let _ = child.start_kill();
    tokio::time::timeout(REAP_WAIT, child.wait())
        .await
        .ok()
        .and_then(Result::ok)
}

async fn write_all_flush(stdin: &mut ChildStdin, frame: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    stdin.write_all(frame).await?;
    stdin.flush().await
}

/// [`watch_job`] under the job watchdog: whatever the cause, a job that
/// holds its process past its hard time limit (plus a grace for the
/// supervisor's own kill), or past `--job-watchdog` when it has none, is
/// recovered: its process killed and replaced, the job reported lost.
async fn watched(
    cfg: &PreforkConfig,
    running: &mut Running,
    job: &Job,
    abort: &tokio_util::sync::CancellationToken,
) -> JobEnd {
    let limit = match job.hard_limit {
        Some(hard) => Some(hard.saturating_add(WATCHDOG_GRACE)),
        None => cfg.job_watchdog,
    };
    let Some(limit) = limit else {
        return watch_job(cfg, running, job, abort).await;
    };
    match tokio::time::timeout(limit, watch_job(cfg, running, job, abort)).await {
        Ok(end) => end,
        Err(_) => {
            kill(running).await;
            if let Some(hard) = job.hard_limit {
                tracing::error!(pid = running.pid, task_id = %job.id, task_name = %job.name, "job watchdog: the job outlived its hard time limit; pool process killed and replaced");
                return JobEnd {
                    outcome: JobOutcome::HardTimeLimit(hard),
                    replace: Some("watchdog"),
                };
            }
            let why = match job.hard_limit {
                Some(hard) => format!(
                    "the job held its pool process {} s past its hard time limit of {} s",
                    WATCHDOG_GRACE.as_secs(),
                    hard.as_secs_f64()
                ),
                None => format!(
                    "the job ran longer than --job-watchdog ({} s), the limit for a task without a hard time limit",
                    limit.as_secs_f64()
                ),
            };
            tracing::error!(pid = running.pid, task_id = %job.id, task_name = %job.name, reason = %why, "job watchdog: pool process killed and replaced");
            JobEnd {
                outcome: JobOutcome::WorkerLost(format!(
                    "Job watchdog: {why}; its process (pid {}) was killed",
                    running.pid
                )),
                replace: Some("watchdog"),
            }
        }
    }
}

/// The supervisor against real processes that misbehave on the pipe: a
/// shell script stands in for the pool process, says Ready like one, then
/// breaks the protocol in the way each test names.
#[cfg(test)]
mod tests {
    use super::*;

    struct NoProgress;
    impl tasks::ProgressSink for NoProgress {
        fn progress(&self, _meta: serde_json::Value) {}
    }

    /// `printf` text for one frame carrying `json`.
    fn frame(json: &str) -> String {
        let len = (json.len() as u32).to_be_bytes();
        let prefix: String = len.iter().map(|b| format!("\\{b:03o}")).collect();
        format!("{prefix}{}", json.replace('%', "%%"))
    }

    /// A pool whose one process runs `script` (sh) after sending Ready.
    fn pool(script: &str, job_watchdog: Option<Duration>) -> PreforkPool {
        let ready = frame(r#"{"Ready":{"pid":1}}"#);
        PreforkPool::start(PreforkConfig {
            size: 1,
            exe: "/bin/sh".into(),
            child_args: vec!["-c".into(), format!("printf '{ready}'; {script}")],
            max_tasks_per_child: None,
            max_memory_kib: None,
            job_watchdog,
        })
    }

    fn job(hard_limit: Option<Duration>) -> Job {
        Job {
            task: Arc::new(tasks::diagnostics::Echo),
            id: "job-1".into(),
            name: "tori.echo".into(),
            args: vec![serde_json::json!("x")],
            kwargs: Default::default(),
            retries: 0,
            soft_limit: None,
            hard_limit,
            cancel: Arc::new(tasks::CancelFlag::new()),
            progress: Arc::new(NoProgress),
            terminate: Arc::default(),
            terminate_signal: Arc::new(std::sync::atomic::AtomicI32::new(15)),
            pid: Arc::default(),
            handed_to: None,
        }
    }

    /// Runs one job; fails the test if the pool does not answer in 60 s
    /// (the wedge these tests guard against).
    async fn run_one(pool: &PreforkPool, job: Job) -> JobOutcome {
        let slot = tokio::time::timeout(Duration::from_secs(60), pool.acquire())
            .await
            .expect("a free slot");
        tokio::time::timeout(Duration::from_secs(60), pool.run(slot, job))
            .await
            .expect("the job ended instead of holding its slot")
            .expect("an outcome")
    }

    /// A reply frame the parent cannot parse (nested past serde_json's
    /// limit) ends the job with an EncodeError that says so, the process
    /// is replaced, and the slot is free again.
    #[tokio::test]
    async fn an_unreadable_reply_ends_the_job_and_frees_the_slot() {
        let deep = format!(
            r#"{{"Done":{{"Ok":{}1{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        // Read the job (whatever it is), answer garbage, then idle alive.
        let p = pool(
            &format!(
                "head -c 4 >/dev/null; printf '{}'; exec sleep 600",
                frame(&deep)
            ),
            None,
        );
        match run_one(&p, job(None)).await {
            JobOutcome::Finished { result: Err(e), .. } => {
                let text = format!("{e:?}");
                assert!(text.contains("EncodeError"), "{text}");
                assert!(text.contains("could not be carried back"), "{text}");
                assert!(text.contains("recursion limit"), "{text}");
            }
            other => panic!("unexpected outcome {other:?}"),
        }
        assert_eq!(p.restarts().get("unreadable-frame"), Some(&1));
        // The slot is free: the replacement answers the same way.
        assert!(matches!(
            run_one(&p, job(None)).await,
            JobOutcome::Finished { result: Err(_), .. }
        ));
    }

    /// A process that dies halfway through a reply is reported lost with
    /// its exit status, not as a reply that could not be read.
    #[tokio::test]
    async fn a_process_killed_mid_reply_is_lost_not_an_encode_error() {
        let p = pool(
            r#"head -c 4 >/dev/null; printf '\000\000\003\350{"Do'; kill -9 $$"#,
            None,
        );
        match run_one(&p, job(None)).await {
            JobOutcome::WorkerLost(why) => assert!(why.contains("signal 9"), "{why}"),
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    /// A process that closes its output but lives on is killed, not waited
    /// for: the job is reported lost.
    #[tokio::test]
    async fn a_process_that_closes_its_pipe_but_lives_is_killed() {
        let p = pool("exec 1>&-; exec sleep 600", None);
        match run_one(&p, job(None)).await {
            JobOutcome::WorkerLost(why) => assert!(why.contains("signal 9"), "{why}"),
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    /// A process that takes the job and never answers is recovered by the
    /// watchdog when the job has no hard time limit.
    #[tokio::test]
    async fn the_watchdog_recovers_a_job_without_a_hard_limit() {
        let p = pool("exec sleep 600", Some(Duration::from_millis(500)));
        match run_one(&p, job(None)).await {
            JobOutcome::WorkerLost(why) => {
                assert!(why.contains("Job watchdog"), "{why}");
                assert!(why.contains("--job-watchdog"), "{why}");
            }
            other => panic!("unexpected outcome {other:?}"),
        }
        assert_eq!(p.restarts().get("watchdog"), Some(&1));
    }

    /// A job with a hard limit ends at that limit through the ordinary
    /// path, not the watchdog's.
    #[tokio::test]
    async fn a_hard_limit_is_not_the_watchdogs_business() {
        let p = pool("exec sleep 600", Some(Duration::from_millis(200)));
        assert!(matches!(
            run_one(&p, job(Some(Duration::from_millis(700)))).await,
            JobOutcome::HardTimeLimit(_)
        ));
    }
}
