//! When the request loop busy-polls and when it sleeps.
//!
//! A driver's accesses come in a predictable rhythm: after each interrupt it reads
//! InterruptStatus and writes InterruptAck (two synchronous accesses its vCPU waits for), then
//! works and publishes its next request. [`InterruptCue`] lets the thread that posts an
//! interrupt bring the request loop back to polling for those accesses, in parallel with the
//! hypervisor's delivery, instead of the first access paying a wake-up. [`PollWindows`] size
//! the busy-poll after the ring runs dry in the spirit of KVM's halt-polling, one window after
//! a posted notify and one after an access or interrupt: each dry spell that ended in a sleep
//! is judged once, whole (window plus sleep), at the wake-up: a window grows when the spell
//! was short enough for the ceiling to have caught its end, and shrinks when it was longer;
//! `--poll-us` is the ceiling. An idle loop sleeps without a timeout, at no CPU.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use log::warn;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Posted interrupts, as the request loop sees them.
pub struct InterruptCue {
    /// Bumped for every interrupt put into the result ring: a polling request loop that sees
    /// it change starts its window again.
    posted: AtomicU64,
    /// The request loop sleeps and wants a posted interrupt to wake it through `wake`.
    asleep: AtomicBool,
    wake: EventFd,
}

impl InterruptCue {
    pub fn new() -> io::Result<Self> {
        Ok(InterruptCue {
            posted: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// An interrupt went into the result ring: its driver's accesses follow.
    ///
    /// With [`Self::going_to_sleep`] this is the store-fence-load pattern of the ring's own
    /// handshake, in `SeqCst` read-modify-writes: either the request loop sees the new count
    /// and polls on, or this sees it asleep and wakes it. Either way a lost cue would only cost
    /// the driver's next access a wake-up through the ring's handshake, never the access.
    pub fn interrupt_posted(&self) {
        self.posted.fetch_add(1, Ordering::SeqCst);
        if self.asleep.swap(false, Ordering::SeqCst) {
            if let Err(error) = self.wake.write(1) {
                warn!("cannot wake the request loop for a posted interrupt: {error}");
            }
        }
    }

    /// How many interrupts were posted so far.
    pub fn posted(&self) -> u64 {
        self.posted.load(Ordering::Relaxed)
    }

    /// The request loop is about to sleep having seen `seen` interrupts posted: false when
    /// more were posted meanwhile (it should poll for their accesses instead).
    pub fn going_to_sleep(&self, seen: u64) -> bool {
        self.asleep.swap(true, Ordering::SeqCst);
        if self.posted.load(Ordering::SeqCst) == seen {
            return true;
        }
        self.awake();
        false
    }

    /// The request loop is awake: posted interrupts need not wake it.
    pub fn awake(&self) {
        self.asleep.store(false, Ordering::Relaxed);
    }

    /// The eventfd the request loop waits on besides the hypervisor's wake-up.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Drains the wake-up.
    pub fn woken(&self) {
        // EAGAIN: drained already (a cue that raced with the loop's own wake-up).
        let _ = self.wake.read();
    }
}

/// What the request loop waits for when the ring runs dry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// After a posted QueueNotify: the driver waits for its completion, which takes the device
    /// its time.
    AfterNotify,
    /// After a synchronous access or a posted interrupt: the driver's next access comes once
    /// its vCPU has taken the answer or the interrupt.
    AfterAccess,
}

/// One busy-poll window per [`Gap`], each adapted on its own.
#[derive(Debug, Clone, Copy)]
pub struct PollWindows([PollWindow; 2]);

impl PollWindows {
    /// Windows of at most `ceiling` (0: never poll), starting at the ceiling.
    pub fn new(ceiling: Duration) -> Self {
        PollWindows([PollWindow::new(ceiling); 2])
    }

    fn window(&mut self, gap: Gap) -> &mut PollWindow {
        &mut self.0[gap as usize]
    }

    pub fn get(&self, gap: Gap) -> Duration {
        self.0[gap as usize].current
    }

    /// The ring stayed dry for `dry_spell` after `gap`, polling through its window and then
    /// sleeping, until a request or a posted interrupt woke the loop.
    pub fn woke(&mut self, gap: Gap, dry_spell: Duration) {
        self.window(gap).judge(dry_spell);
    }
}

/// The busy-poll window after the ring runs dry, adapted in the spirit of KVM's halt-polling.
#[derive(Debug, Clone, Copy)]
struct PollWindow {
    current: Duration,
    ceiling: Duration,
}

/// The first window a grown one starts from, as KVM's `halt_poll_ns_grow_start`.
const GROW_START: Duration = Duration::from_micros(10);

impl PollWindow {
    fn new(ceiling: Duration) -> Self {
        PollWindow {
            current: ceiling,
            ceiling,
        }
    }

    /// Halves the window, down to none below [`GROW_START`]. On a busy machine a spinning
    /// thread holds a core the driver's own vCPU (or the device's worker) needs, the spells
    /// stretch past the ceiling one after the other: polling stops paying, and stops.
    fn shrink(&mut self) {
        self.current /= 2;
        if self.current < GROW_START {
            self.current = Duration::ZERO;
        }
    }

    /// A dry spell (window and sleep) lasted `dry_spell`. As KVM's halt-polling, the spell is
    /// judged against the ceiling, not against the window: the sleep includes the wake-up's
    /// own latency (tens of microseconds on a virtualised root zone), so a window judged
    /// against itself could never grow back from nothing, and one collapse would leave every
    /// later request paying wake-ups. Judging the spell once, rather than shrinking when the
    /// window runs out and growing after the sleep, keeps a window that fell just short of
    /// the driver's rhythm growing instead of see-sawing (ring-bench --pin, 64 KiB rounds: a
    /// sleep before 1 request in 3 that way, almost none judged whole). A spell within the
    /// ceiling doubles the window (from [`GROW_START`]), a longer one halves it.
    fn judge(&mut self, dry_spell: Duration) {
        if dry_spell <= self.ceiling {
            self.current = (self.current * 2).max(GROW_START).min(self.ceiling);
        } else {
            self.shrink();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CEILING: Duration = Duration::from_micros(50);

    #[test]
    fn long_spells_shrink_the_window_to_nothing_and_short_ones_grow_it_to_the_ceiling() {
        let mut windows = PollWindows::new(CEILING);
        let gap = Gap::AfterAccess;
        let long = CEILING + Duration::from_micros(1);
        assert_eq!(windows.get(gap), CEILING);
        windows.woke(gap, long);
        assert_eq!(windows.get(gap), CEILING / 2);
        windows.woke(gap, long);
        assert_eq!(
            windows.get(gap),
            Duration::from_micros(12) + Duration::from_nanos(500)
        );
        windows.woke(gap, Duration::from_secs(1));
        assert_eq!(windows.get(gap), Duration::ZERO);
        windows.woke(gap, Duration::from_secs(1));
        assert_eq!(windows.get(gap), Duration::ZERO, "idle: no polling at all");
        windows.woke(gap, Duration::from_micros(8));
        assert_eq!(windows.get(gap), GROW_START);
        windows.woke(gap, GROW_START);
        assert_eq!(windows.get(gap), GROW_START * 2);
        for _ in 0..10 {
            windows.woke(gap, Duration::from_micros(5));
        }
        assert_eq!(windows.get(gap), CEILING);
        assert_eq!(
            windows.get(Gap::AfterNotify),
            CEILING,
            "each gap has its own window"
        );
    }

    /// A spell that outlasted its window but ended within the ceiling is one a longer window
    /// would have caught: the window grows, it does not see-saw between a shrink for the
    /// window that ran out and a growth for the sleep that followed.
    #[test]
    fn a_spell_just_past_the_window_grows_it() {
        let mut windows = PollWindows::new(CEILING);
        let gap = Gap::AfterNotify;
        windows.woke(gap, Duration::from_secs(1));
        windows.woke(gap, Duration::from_secs(1));
        let window = windows.get(gap);
        assert_eq!(window, CEILING / 4);
        for _ in 0..3 {
            windows.woke(gap, window + Duration::from_micros(2));
        }
        assert_eq!(windows.get(gap), CEILING);
    }

    /// A wake-up that itself takes longer than the window (a slow eventfd wake-up) must not
    /// keep a collapsed window at nothing: every later request would pay a wake-up.
    #[test]
    fn a_collapsed_window_grows_back_on_spells_within_the_ceiling() {
        let mut windows = PollWindows::new(CEILING);
        let gap = Gap::AfterAccess;
        for _ in 0..4 {
            windows.woke(gap, Duration::from_millis(1));
        }
        assert_eq!(windows.get(gap), Duration::ZERO);
        let slow_wakeup = CEILING - Duration::from_micros(5);
        for _ in 0..4 {
            windows.woke(gap, slow_wakeup);
        }
        assert_eq!(windows.get(gap), CEILING);
    }

    #[test]
    fn a_zero_ceiling_never_polls() {
        let mut windows = PollWindows::new(Duration::ZERO);
        windows.woke(Gap::AfterAccess, Duration::ZERO);
        assert_eq!(windows.get(Gap::AfterAccess), Duration::ZERO);
        windows.woke(Gap::AfterAccess, Duration::from_secs(1));
        assert_eq!(windows.get(Gap::AfterAccess), Duration::ZERO);
    }

    #[test]
    fn a_posted_interrupt_wakes_a_sleeping_loop_once() {
        let cue = InterruptCue::new().unwrap();
        cue.interrupt_posted();
        assert_eq!(cue.posted(), 1);
        assert!(cue.wake.read().is_err(), "awake: no wake-up written");
        assert!(
            !cue.going_to_sleep(0),
            "an interrupt came after the loop looked"
        );
        assert!(cue.going_to_sleep(1));
        cue.interrupt_posted();
        cue.interrupt_posted();
        assert_eq!(cue.posted(), 3);
        assert_eq!(cue.wake.read().unwrap(), 1, "one wake-up per sleep");
        cue.awake();
        cue.interrupt_posted();
        assert!(cue.wake.read().is_err(), "awake again: no wake-up written");
    }
}
