//! The process's logger: env_logger (RUST_LOG works as usual) with every call site held to
//! [`LINES_PER_SECOND`] lines a second, whoever logs there — our code or a rust-vmm crate a
//! guest or frontend can make log at will (virtio-queue logs an avail entry it cannot read at
//! ERROR each time it meets one). What a site logs beyond that is counted and reported once its second is over
//! as "N similar lines suppressed", so log volume is bounded whatever a guest or frontend does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{Level, Log, Metadata, Record};

/// Lines one call site may log per second.
pub const LINES_PER_SECOND: u32 = 10;
const WINDOW: Duration = Duration::from_secs(1);
/// Call sites tracked at once; far more than the code has. Beyond it, sites not heard from
/// for a window are forgotten, and any still left over share one budget.
const MAX_SITES: usize = 4096;

/// Where a line comes from: its source location, or for records without one, its target.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Site {
    Static {
        file: &'static str,
        line: u32,
    },
    Owned {
        target: String,
        file: String,
        line: u32,
    },
    /// All sites beyond `MAX_SITES`.
    Overflow,
}

impl Site {
    fn of(record: &Record<'_>) -> Self {
        match (record.file_static(), record.line()) {
            (Some(file), Some(line)) => Site::Static { file, line },
            (file, line) => Site::Owned {
                target: record.target().to_owned(),
                file: file.or(record.file()).unwrap_or_default().to_owned(),
                line: line.unwrap_or_default(),
            },
        }
    }
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Site::Static { file, line } => write!(f, "{file}:{line}"),
            Site::Owned { target, file, line } => write!(f, "{target} {file}:{line}"),
            Site::Overflow => f.write_str("various places"),
        }
    }
}

struct SiteState {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
    /// Level and target of the suppressed lines, for their summary.
    level: Level,
    target: String,
}

/// A summary due for one site.
struct Suppressed {
    site: Site,
    count: u64,
    level: Level,
    target: String,
}

/// Wraps a logger so that each call site logs at most `limit` lines per second.
pub struct RateLimited<L> {
    inner: L,
    limit: u32,
    sites: Mutex<HashMap<Site, SiteState>>,
}

impl<L: Log> RateLimited<L> {
    pub fn new(inner: L, limit: u32) -> Self {
        RateLimited {
            inner,
            limit,
            sites: Mutex::new(HashMap::new()),
        }
    }

    fn lock_sites(&self) -> std::sync::MutexGuard<'_, HashMap<Site, SiteState>> {
        self.sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `record` may be logged at `now`, and the summary of the previous window of its
    /// site if lines were suppressed there.
    fn admit(&self, record: &Record<'_>, now: Instant) -> (bool, Option<Suppressed>) {
        let mut sites = self.lock_sites();
        let mut site = Site::of(record);
        if !sites.contains_key(&site) && sites.len() >= MAX_SITES {
            sites.retain(|_, state| {
                now.saturating_duration_since(state.window_start) < WINDOW || state.suppressed > 0
            });
            if sites.len() >= MAX_SITES {
                site = Site::Overflow;
            }
        }
        let state = sites.entry(site.clone()).or_insert_with(|| SiteState {
            window_start: now,
            logged: 0,
            suppressed: 0,
            level: record.level(),
            target: record.target().to_owned(),
        });
        let mut summary = None;
        if now.saturating_duration_since(state.window_start) >= WINDOW {
            summary = take_summary(&site, state);
            state.window_start = now;
            state.logged = 0;
        }
        if state.logged < self.limit {
            state.logged += 1;
            (true, summary)
        } else {
            state.suppressed += 1;
            state.level = record.level();
            state.target.clear();
            state.target.push_str(record.target());
            (false, summary)
        }
    }

    /// Logs the summaries of sites whose window with suppressed lines is over; a background
    /// thread calls it so a flood that stops still gets its summary.
    pub fn emit_due_summaries(&self, now: Instant) {
        let due: Vec<Suppressed> = self
            .lock_sites()
            .iter_mut()
            .filter(|(_, state)| now.saturating_duration_since(state.window_start) >= WINDOW)
            .filter_map(|(site, state)| take_summary(site, state))
            .collect();
        for summary in due {
            self.log_summary(&summary);
        }
    }

    fn log_at(&self, record: &Record<'_>, now: Instant) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        let (admitted, summary) = self.admit(record, now);
        if let Some(summary) = summary {
            self.log_summary(&summary);
        }
        if admitted {
            self.inner.log(record);
        }
    }

    fn log_summary(&self, summary: &Suppressed) {
        self.inner.log(
            &Record::builder()
                .level(summary.level)
                .target(&summary.target)
                .args(format_args!(
                    "{} similar lines suppressed (logged at {}, more than {} a second)",
                    summary.count, summary.site, self.limit
                ))
                .build(),
        );
    }
}

fn take_summary(site: &Site, state: &mut SiteState) -> Option<Suppressed> {
    (state.suppressed > 0).then(|| Suppressed {
        site: site.clone(),
        count: std::mem::take(&mut state.suppressed),
        level: state.level,
        target: state.target.clone(),
    })
}

impl<L: Log> Log for RateLimited<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        self.log_at(record, Instant::now());
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs env_logger, filtered by RUST_LOG (default `info`) and rate-limited per call
/// site, as the process's logger.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max_level = inner.filter();
    let logger: &'static RateLimited<env_logger::Logger> =
        Box::leak(Box::new(RateLimited::new(inner, LINES_PER_SECOND)));
    if log::set_logger(logger).is_err() {
        return;
    }
    log::set_max_level(max_level);
    let summaries = std::thread::Builder::new()
        .name("log-summaries".into())
        .spawn(move || {
            loop {
                std::thread::sleep(WINDOW);
                logger.emit_due_summaries(Instant::now());
            }
        });
    if let Err(error) = summaries {
        log::warn!("suppressed log lines are summarised only when their site logs again: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::LevelFilter;

    /// Keeps what it is given.
    #[derive(Default)]
    struct Capture(Mutex<Vec<String>>);

    impl Log for Capture {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.level() <= LevelFilter::Info
        }

        fn log(&self, record: &Record<'_>) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {}", record.level(), record.args()));
        }

        fn flush(&self) {}
    }

    fn lines(logger: &RateLimited<Capture>) -> Vec<String> {
        std::mem::take(&mut *logger.inner.0.lock().unwrap())
    }

    fn record<'a>(args: std::fmt::Arguments<'a>, line: u32, level: Level) -> Record<'a> {
        Record::builder()
            .args(args)
            .level(level)
            .target("virtio_queue::queue")
            .file_static(Some("src/queue.rs"))
            .line(Some(line))
            .build()
    }

    fn feed(logger: &RateLimited<Capture>, count: usize, line: u32, now: Instant) {
        for index in 0..count {
            logger.log_at(
                &record(format_args!("Iterator error {index}"), line, Level::Error),
                now,
            );
        }
    }

    #[test]
    fn a_flood_from_one_site_is_held_to_the_limit_with_a_summary() {
        let logger = RateLimited::new(Capture::default(), LINES_PER_SECOND);
        let start = Instant::now();
        feed(&logger, 100_000, 573, start);
        let first_second = lines(&logger);
        assert_eq!(first_second.len(), LINES_PER_SECOND as usize);
        assert_eq!(first_second[0], "ERROR Iterator error 0");

        // The flood stops: the summary comes when the second is over.
        logger.emit_due_summaries(start + Duration::from_millis(500));
        assert!(
            lines(&logger).is_empty(),
            "no summary before the second is over"
        );
        logger.emit_due_summaries(start + WINDOW);
        assert_eq!(
            lines(&logger),
            [format!(
                "ERROR {} similar lines suppressed (logged at src/queue.rs:573, more than \
                 {LINES_PER_SECOND} a second)",
                100_000 - LINES_PER_SECOND
            )]
        );
        logger.emit_due_summaries(start + 3 * WINDOW);
        assert!(lines(&logger).is_empty(), "one summary per suppression");
    }

    #[test]
    fn a_flood_that_goes_on_gets_a_summary_each_second() {
        let logger = RateLimited::new(Capture::default(), LINES_PER_SECOND);
        let start = Instant::now();
        for second in 0..5 {
            feed(&logger, 1000, 573, start + second * WINDOW);
            let logged = lines(&logger);
            let expected = if second == 0 {
                LINES_PER_SECOND as usize
            } else {
                LINES_PER_SECOND as usize + 1
            };
            assert_eq!(logged.len(), expected, "second {second}: {logged:?}");
            if second > 0 {
                assert!(logged[0].starts_with("ERROR 990 similar lines suppressed"));
            }
        }
    }

    #[test]
    fn sites_are_limited_apart_and_filtered_lines_do_not_count() {
        let logger = RateLimited::new(Capture::default(), LINES_PER_SECOND);
        let now = Instant::now();
        feed(&logger, 50, 1, now);
        feed(&logger, 50, 2, now);
        assert_eq!(lines(&logger).len(), 2 * LINES_PER_SECOND as usize);
        // Below the inner logger's level: dropped before it counts against the site.
        for _ in 0..50 {
            logger.log(&record(format_args!("noise"), 3, Level::Debug));
        }
        logger.log(&record(format_args!("kept"), 3, Level::Warn));
        assert_eq!(lines(&logger), ["WARN kept"]);
    }

    #[test]
    fn many_sites_share_one_budget_beyond_the_tracked_number() {
        let logger = RateLimited::new(Capture::default(), LINES_PER_SECOND);
        let now = Instant::now();
        for line in 0..(MAX_SITES as u32 + 1000) {
            feed(&logger, 1, line, now);
        }
        assert_eq!(
            lines(&logger).len(),
            MAX_SITES + LINES_PER_SECOND as usize,
            "the sites beyond the tracked ones get one budget together"
        );
        assert!(logger.lock_sites().len() <= MAX_SITES + 1);
    }
}
