//! Agreement between ranks before any collective that could hang: errors on one rank reach every
//! rank, and a configuration that differs between ranks stops the job with the values that differ.

use std::fmt;

use serde_json::Value;

use crate::distributed::comm::Communicator;

/// An error that every rank has seen; rank 0 reports it, every rank exits non-zero.
#[derive(Debug)]
pub struct Agreed(pub String);

impl fmt::Display for Agreed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Agreed {}

/// Share each rank's outcome: Ok on every rank when all succeeded, otherwise the same error
/// (naming the failed ranks) on every rank. One collective; a no-op in a single process.
pub fn agree<T>(comm: &dyn Communicator, r: anyhow::Result<T>) -> anyhow::Result<T> {
    if comm.size() == 1 {
        return r;
    }
    let mine = match &r {
        Ok(_) => String::new(),
        Err(e) => one_line(e),
    };
    let all = comm.all_gather_bytes(mine.as_bytes())?;
    let failed: Vec<(usize, String)> = all
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.is_empty())
        .map(|(i, m)| (i, String::from_utf8_lossy(m).into_owned()))
        .collect();
    if failed.is_empty() {
        return r;
    }
    let same = failed.iter().all(|(_, m)| *m == failed[0].1);
    let msg = if same && failed.len() == comm.size() {
        failed[0].1.clone()
    } else if same {
        let ranks: Vec<String> = failed.iter().map(|(i, _)| i.to_string()).collect();
        format!("rank {}: {}", ranks.join(", "), failed[0].1)
    } else {
        failed
            .iter()
            .map(|(i, m)| format!("rank {i}: {m}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Err(Agreed(msg).into())
}

/// Compare a JSON object of settings across ranks; on any difference every rank gets
/// "configuration differs between ranks: key: rank 0 = a, rank 1 = b; ...".
pub fn check_same(comm: &dyn Communicator, fingerprint: &Value) -> anyhow::Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let bytes = serde_json::to_vec(fingerprint)?;
    let all: Vec<Value> = comm
        .all_gather_bytes(&bytes)?
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
        .collect();
    let mut diffs = Vec::new();
    if let Some(first) = all[0].as_object() {
        for key in first.keys() {
            let values: Vec<&Value> = all
                .iter()
                .map(|v| v.get(key).unwrap_or(&Value::Null))
                .collect();
            if values.iter().any(|v| *v != values[0]) {
                let per_rank: Vec<String> = values
                    .iter()
                    .enumerate()
                    .map(|(r, v)| format!("rank {r} = {v}"))
                    .collect();
                diffs.push(format!("{key}: {}", per_rank.join(", ")));
            }
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Agreed(format!(
            "configuration differs between ranks: {}",
            diffs.join("; ")
        ))
        .into())
    }
}

/// An error and its causes on one line, each cause said once (a message that already quotes its
/// source, as thiserror's `{source}` does, does not repeat it), whitespace collapsed.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg += ": ";
        }
        msg += &text;
    }
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}
