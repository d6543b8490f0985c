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

use super::ipc::{read_frame_async, write_frame_async, FromChild, JobSpec, ToChild};
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
}

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
    frames: mpsc::UnboundedReceiver<FromChild>,
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
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout);
        while let Ok(Some(frame)) = read_frame_async::<FromChild>(&mut reader).await {
            if tx.send(frame).is_err() {
                break;
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(300), frames.recv()).await {
        Ok(Some(FromChild::Ready { .. })) => Ok(Running {
            child,
            stdin,
            frames,
            pid,
        }),
        Ok(_) => {
            let status = child.wait().await.ok();
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
            let spec = JobSpec {
                id: dispatch.job.id.clone(),
                name: dispatch.job.name.clone(),
                args: dispatch.job.args.clone(),
                kwargs: dispatch.job.kwargs.clone(),
                retries: dispatch.job.retries,
            };
            let stdin = running.stdin.as_mut().expect("stdin open while serving");
            if write_frame_async(stdin, &ToChild::Run(spec)).await.is_err() {
                // The child died before it got the job: the job is intact,
                // run it on the replacement.
                tracing::warn!(
                    child = index,
                    pid = running.pid,
                    "pool process gone before it received a job; replacing it"
                );
                shared.restarts.add("exited-idle");
                pending = Some(dispatch);
                let _ = running.child.start_kill();
                let _ = running.child.wait().await;
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
            let end = watch_job(&cfg, &mut running, &dispatch.job, &shared.abort).await;
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
        let _ = running.child.start_kill();
        let _ = running.child.wait().await;
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
                Some(FromChild::Progress(meta)) => job.progress.progress(meta),
                Some(FromChild::Done(result)) => {
                    return JobEnd { outcome: JobOutcome::Finished { result, pid: running.pid }, replace: None };
                }
                Some(FromChild::Panicked(message)) => {
                    return JobEnd { outcome: JobOutcome::Panicked(message), replace: None };
                }
                Some(FromChild::Ready { .. }) => {}
                None => {
                    let status = running.child.wait().await.ok();
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
    let _ = running.child.wait().await;
}
