//! `tori-worker dead-letter ...`: the operator's view of the dead-letter
//! list. The Redis side is `tori_worker::dead_letter`; this only prints.
//! Output goes to stdout (JSON with `--json`), errors to stderr with a
//! non-zero exit. The broker URL is never printed: it may hold a password.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tori_worker::broker::keys::Keys;
use tori_worker::config::{DeadLetterAction, DeadLetterArgs};
use tori_worker::dead_letter::{DeadLetters, Record, Summary};
use tori_worker::redis_link::RedisLink;

pub fn run(args: DeadLetterArgs) -> anyhow::Result<()> {
    let settings = args.broker.settings()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let link = RedisLink::connect_to(&settings, "dead-letter", Duration::from_secs(30))?;
    let keys = Keys::new(&args.broker.key_prefix()?, &args.broker.dead_letter_key);
    let dl = DeadLetters::new(link, keys);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(act(&dl, args.action, args.json))
}

async fn act(dl: &DeadLetters, action: DeadLetterAction, json: bool) -> anyhow::Result<()> {
    let list = &dl.keys().dead_letter;
    match action {
        DeadLetterAction::List => {
            let records = dl.list().await?;
            if json {
                print_json(&records)?;
            } else if records.is_empty() {
                println!("{list} is empty");
            } else {
                print_table(&records);
            }
        }
        DeadLetterAction::Show { id } => {
            let record = dl.find(&id).await?;
            if json {
                print_json(&record.to_json())?;
            } else {
                print_record(&record);
            }
        }
        DeadLetterAction::Requeue { id, all, queue } => {
            let (requeued, skipped) = match id {
                Some(id) if !all => {
                    let record = dl.find(&id).await?;
                    (vec![dl.requeue(&record, queue.as_deref()).await?], vec![])
                }
                _ => dl.requeue_all(queue.as_deref()).await?,
            };
            if json {
                print_json(&json!({"requeued": requeued, "skipped": skipped}))?;
            } else {
                for r in &requeued {
                    println!(
                        "requeued {} to queue {} (task {} {})",
                        r.id,
                        r.queue,
                        r.task_name.as_deref().unwrap_or("?"),
                        r.task_id.as_deref().unwrap_or("?"),
                    );
                }
                for s in &skipped {
                    println!("left {}: {}", s.id, s.error);
                }
                println!(
                    "{} requeued, {} left in {list}",
                    requeued.len(),
                    skipped.len()
                );
            }
            if !skipped.is_empty() {
                anyhow::bail!("{} dead letters could not be requeued", skipped.len());
            }
        }
        DeadLetterAction::Purge { id: Some(id) } => {
            let record = dl.purge_one(&id).await?;
            if json {
                print_json(&json!({"purged": 1, "ids": [record.id]}))?;
            } else {
                println!("purged {} from {list}", record.id);
            }
        }
        DeadLetterAction::Purge { id: None } => {
            let n = dl.purge().await?;
            if json {
                print_json(&json!({"purged": n}))?;
            } else {
                println!("purged {n} dead letters from {list}");
            }
        }
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// An epoch time as UTC, to the second.
fn when(epoch: Option<f64>) -> String {
    epoch
        .filter(|t| t.is_finite())
        .and_then(|t| chrono::DateTime::from_timestamp(t.floor() as i64, 0))
        .map_or_else(
            || "?".to_owned(),
            |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
}

/// A field for one line: control characters (the priority separator in a
/// list key, newlines in a reason) would break the table.
fn clean(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s
            .chars()
            .map(|c| if c.is_control() { '·' } else { c })
            .collect(),
        _ => "-".to_owned(),
    }
}

fn print_table(records: &[Summary]) {
    println!(
        "{:<32}  {:<20}  {:<16}  {:<24}  {:<36}  {:>9}  REASON",
        "ID", "RECEIVED", "QUEUE", "TASK", "TASK ID", "SIZE"
    );
    for r in records {
        println!(
            "{:<32}  {:<20}  {:<16}  {:<24}  {:<36}  {:>9}  {}",
            r.id,
            when(r.received_at),
            clean(r.queue.as_deref()),
            clean(r.task_name.as_deref()),
            clean(r.task_id.as_deref()),
            r.raw_size,
            clean(r.reason.as_deref()),
        );
    }
}

fn print_record(record: &Record) {
    let s = record.summary();
    println!("id:          {}", s.id);
    println!(
        "received_at: {} ({})",
        when(s.received_at),
        s.received_at.map_or_else(|| "?".into(), |t| t.to_string())
    );
    println!("queue:       {}", clean(s.queue.as_deref()));
    println!("reason:      {}", clean(s.reason.as_deref()));
    println!("worker:      {}", clean(s.worker.as_deref()));
    println!("task:        {}", clean(s.task_name.as_deref()));
    println!("task id:     {}", clean(s.task_id.as_deref()));
    println!("raw ({} bytes):", s.raw_size);
    println!("{}", record.raw().unwrap_or(&record.text));
}
