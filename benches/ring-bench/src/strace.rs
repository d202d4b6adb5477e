//! System calls per request, from `strace -f -c` summaries of two runs that differ only in the
//! number of requests: the difference cancels start-up and shutdown.

use std::collections::BTreeMap;
use std::path::Path;

use crate::Error;

/// Calls per system call name in one `strace -c` summary (the `total` line left out).
pub fn parse_summary(text: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for line in text.lines() {
        // "% time  seconds  usecs/call  calls  [errors]  syscall": the errors column may be
        // empty, so the count is always the fourth field and the name the last.
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(count)) = (fields.last(), fields.get(3)) else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        if fields.len() >= 5 && *name != "total" {
            *calls.entry((*name).to_owned()).or_default() += count;
        }
    }
    calls
}

pub fn read_summary(path: &Path) -> Result<BTreeMap<String, u64>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("strace summary {}: {error}", path.display()))?;
    Ok(parse_summary(&text))
}

/// Calls per request of each system call, the most frequent first: (`loaded` - `baseline`) /
/// `requests`.
pub fn per_request(
    loaded: &BTreeMap<String, u64>,
    baseline: &BTreeMap<String, u64>,
    requests: u64,
) -> Vec<(String, f64)> {
    let mut rates: Vec<(String, f64)> = loaded
        .iter()
        .map(|(name, &count)| {
            let base = baseline.get(name).copied().unwrap_or(0);
            (
                name.clone(),
                count.saturating_sub(base) as f64 / requests.max(1) as f64,
            )
        })
        .filter(|(_, rate)| *rate > 0.0)
        .collect();
    rates.sort_by(|a, b| b.1.total_cmp(&a.1));
    rates
}

/// Whether `strace` can be run.
pub fn available() -> bool {
    std::process::Command::new("strace")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 53.66    0.000286           5        50           epoll_wait
 20.00    0.000100           2        40        12 read
  1.00    0.000010           1         3           write
------ ----------- ----------- --------- --------- ----------------
100.00    0.000533           5        93        12 total
";

    #[test]
    fn reads_counts_with_and_without_errors() {
        let calls = parse_summary(SUMMARY);
        assert_eq!(calls.len(), 3);
        assert_eq!(calls["epoll_wait"], 50);
        assert_eq!(calls["read"], 40);
        assert_eq!(calls["write"], 3);
    }

    #[test]
    fn per_request_subtracts_the_baseline() {
        let loaded = parse_summary(SUMMARY);
        let mut baseline = BTreeMap::new();
        baseline.insert("epoll_wait".to_owned(), 30);
        baseline.insert("write".to_owned(), 3);
        let rates = per_request(&loaded, &baseline, 10);
        // read 40 / 10, epoll_wait (50 - 30) / 10, write (3 - 3) left out.
        assert_eq!(
            rates,
            vec![("read".to_owned(), 4.0), ("epoll_wait".to_owned(), 2.0)]
        );
    }
}
