//! Medians and spreads over the rounds, printed side by side.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::daemon::Template;
use crate::workload::{Plan, RunResult};

const LABEL_WIDTH: usize = 46;
const COLUMN_WIDTH: usize = 28;

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Median, minimum and maximum of `values`.
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = match sorted.len() {
        0 => return None,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    };
    Some((median, sorted[0], sorted[sorted.len() - 1]))
}

fn cell(values: &[f64], decimals: usize) -> String {
    match spread(values) {
        Some((median, min, max)) => {
            format!("{median:.decimals$} [{min:.decimals$}-{max:.decimals$}]")
        }
        None => "-".into(),
    }
}

/// A run in one line, printed as the rounds go.
pub fn one_line(result: &RunResult) -> String {
    let mut line = format!(
        "sync read {:.1} us busy, {:.1} us after idle; 4 KiB read {:.1} us; 64 KiB {:.1} \
         us/request, CPU {:.0} ms; idle CPU {:.0} ms",
        micros(result.sync_busy.median),
        micros(result.sync_idle.median),
        micros(result.small_read.median),
        micros(result.large_per_request),
        millis(result.large_cpu),
        millis(result.idle_cpu),
    );
    if result.never_slept {
        line.push_str(" (never set need_wakeup before the guest started)");
    }
    line
}

/// The table of every daemon's figures: median [min-max] over the rounds.
pub fn summary(templates: &[Template], results: &[Vec<RunResult>], plan: &Plan) {
    let rounds = results.first().map_or(0, Vec::len);
    println!("median [min-max] over {rounds} rounds");
    let mut header = format!("{:LABEL_WIDTH$}", "");
    for template in templates {
        header.push_str(&format!("{:>COLUMN_WIDTH$}", template.label));
    }
    println!("{header}");
    type Value = fn(&RunResult) -> f64;
    let latency = |label: String, median: Value, p99: Value, decimals| {
        [
            (label, median, decimals),
            ("  99th percentile (us)".to_owned(), p99, 1),
        ]
    };
    let mut rows: Vec<(String, Value, usize)> = Vec::new();
    if plan.busy_reads > 0 {
        rows.extend(latency(
            "sync register read, back to back (us)".into(),
            |r| micros(r.sync_busy.median),
            |r| micros(r.sync_busy.p99),
            2,
        ));
    }
    if plan.idle_reads > 0 {
        let gap_ms = plan.idle_gap.as_secs_f64() * 1e3;
        rows.extend(latency(
            format!("sync register read, after {gap_ms} ms idle (us)"),
            |r| micros(r.sync_idle.median),
            |r| micros(r.sync_idle.p99),
            1,
        ));
    }
    if plan.small_reads > 0 {
        rows.extend(latency(
            "blk 4 KiB QD1 read (us)".into(),
            |r| micros(r.small_read.median),
            |r| micros(r.small_read.p99),
            1,
        ));
        rows.push((
            "  daemon CPU per 4 KiB read (us)".into(),
            |r| micros(r.small_cpu_per_request),
            1,
        ));
    }
    rows.extend([
        (
            "blk 64 KiB write + read-back (us/request)".to_owned(),
            (|r| micros(r.large_per_request)) as Value,
            1,
        ),
        (
            "  daemon CPU in those rounds (ms)".into(),
            |r| millis(r.large_cpu),
            0,
        ),
        (
            "  daemon CPU per request (us)".into(),
            |r| micros(r.large_cpu_per_request),
            1,
        ),
        (
            "  wake-ups sent per request".into(),
            |r| r.large_wakeups_per_request,
            2,
        ),
    ]);
    if !plan.idle_after.is_zero() {
        rows.push((
            format!(
                "daemon CPU over {} s idle afterwards (ms)",
                plan.idle_after.as_secs_f64()
            ),
            |r| millis(r.idle_cpu),
            0,
        ));
    }
    for (label, value, decimals) in rows {
        let mut line = format!("{label:LABEL_WIDTH$}");
        for runs in results {
            let values: Vec<f64> = runs.iter().map(value).collect();
            line.push_str(&format!("{:>COLUMN_WIDTH$}", cell(&values, decimals)));
        }
        println!("{line}");
    }
    let mut spreads = format!("{:LABEL_WIDTH$}", "64 KiB us/request: (max-min)/median");
    for runs in results {
        let values: Vec<f64> = runs.iter().map(|r| micros(r.large_per_request)).collect();
        let text = spread(&values)
            .filter(|(median, _, _)| *median > 0.0)
            .map_or("-".into(), |(median, min, max)| {
                format!("{:.0} %", (max - min) / median * 100.0)
            });
        spreads.push_str(&format!("{text:>COLUMN_WIDTH$}"));
    }
    println!("{spreads}");
    println!("(CPU from /proc utime + stime, in clock ticks of 10 ms on most kernels)");

    for (template, runs) in templates.iter().zip(results) {
        println!();
        println!(
            "{}: CPU per thread during the 64 KiB rounds (ms), median [min-max]",
            template.label
        );
        let names: BTreeSet<&String> = runs.iter().flat_map(|r| r.large_threads.keys()).collect();
        for name in names {
            let values: Vec<f64> = runs
                .iter()
                .map(|r| r.large_threads.get(name).copied().map_or(0.0, millis))
                .collect();
            println!("  {name:30} {}", cell(&values, 0));
        }
        match runs.iter().rev().find_map(|r| r.counters.as_ref()) {
            Some(counters) => println!("  counters (last round): {counters}"),
            None => println!("  counters: none printed (no hvisor-vhost-counters line)"),
        }
        let never_slept = runs.iter().filter(|r| r.never_slept).count();
        if never_slept > 0 {
            println!(
                "  note: in {never_slept} run(s) it never set need_wakeup before the guest started"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_of_an_even_count() {
        assert_eq!(spread(&[4.0, 1.0, 3.0, 2.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(spread(&[5.0, 1.0, 3.0]), Some((3.0, 1.0, 5.0)));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn a_cell_shows_median_and_range() {
        assert_eq!(cell(&[72.2, 71.1, 73.2], 1), "72.2 [71.1-73.2]");
        assert_eq!(cell(&[], 1), "-");
    }
}
