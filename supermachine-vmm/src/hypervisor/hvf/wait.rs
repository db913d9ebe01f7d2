//! Where an idle vCPU thread sleeps: a guest WFI (until an interrupt, the guest's timer
//! deadline or a kick), or a powered-off secondary (until a PSCI CPU_ON or a kick).
//!
//! KVM sleeps a vCPU inside `KVM_RUN` and wakes it from the kernel; Hypervisor.framework returns
//! every WFI to the VMM, so the VMM sleeps the thread itself. A [`Waker`] is one vCPU's bed:
//! `kick` (the host wants the thread out of `run`) is sticky until taken; `wake` (an interrupt
//! was raised, or CPU_ON) bumps a generation, so a wake that came between the vCPU's last guest
//! entry and its sleep is never lost.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One vCPU's wake-up state.
#[derive(Debug, Default)]
pub(crate) struct Waker {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    kicked: bool,
    generation: u64,
}

/// Why [`Waker::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The vCPU was kicked (the kick is still pending: [`Waker::take_kick`] consumes it).
    Kicked,
    /// Woken since `since` (an interrupt or CPU_ON).
    Woken,
    /// The deadline passed.
    TimedOut,
}

impl Waker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the vCPU to leave `run`: wakes a sleeper, and stays set until taken.
    pub(crate) fn kick(&self) {
        self.lock().kicked = true;
        self.changed.notify_all();
    }

    /// Consumes a pending kick.
    pub(crate) fn take_kick(&self) -> bool {
        std::mem::take(&mut self.lock().kicked)
    }

    /// Signals an interrupt or a power-on for this vCPU.
    pub(crate) fn wake(&self) {
        self.lock().generation += 1;
        self.changed.notify_all();
    }

    /// How many wakes there were so far (sample it before entering the guest).
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Sleeps until kicked, woken after generation `since`, or `until` passes (never without
    /// a deadline). Returns at once when either already happened.
    pub(crate) fn wait(&self, since: u64, until: Option<Instant>) -> Wake {
        let mut state = self.lock();
        loop {
            if state.kicked {
                return Wake::Kicked;
            }
            if state.generation != since {
                return Wake::Woken;
            }
            state = match until {
                None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Wake::TimedOut;
                    }
                    self.changed
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

/// The guest's virtual timer as its registers describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Disabled or masked: it wakes nobody.
    Off,
    /// Its condition holds already: the interrupt is (or is about to be) pending.
    Expired,
    /// It fires after this long.
    In(Duration),
}

/// CNTV_CTL_EL0 bits.
const CTL_ENABLE: u64 = 1;
const CTL_IMASK: u64 = 1 << 1;
const CTL_ISTATUS: u64 = 1 << 2;

/// Reads the timer from CNTV_CTL_EL0, CNTV_CVAL_EL0 and the guest's current virtual count
/// (`now`, at `hz` ticks a second).
pub(crate) fn timer(ctl: u64, cval: u64, now: u64, hz: u64) -> Timer {
    if ctl & CTL_ENABLE == 0 || ctl & CTL_IMASK != 0 {
        return Timer::Off;
    }
    if ctl & CTL_ISTATUS != 0 || cval <= now {
        return Timer::Expired;
    }
    let ticks = u128::from(cval - now);
    let nanos = ticks * 1_000_000_000 / u128::from(hz.max(1));
    Timer::In(Duration::from_nanos(
        u64::try_from(nanos).unwrap_or(u64::MAX),
    ))
}

/// Whether the timer drives its interrupt line (enabled, unmasked, condition met): while it
/// does, the framework keeps it masked; once it does not, the backend unmasks it.
pub(crate) fn timer_asserted(ctl: u64) -> bool {
    ctl & (CTL_ENABLE | CTL_IMASK | CTL_ISTATUS) == CTL_ENABLE | CTL_ISTATUS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_kick_before_the_wait_returns_at_once_and_is_taken_once() {
        let w = Waker::default();
        w.kick();
        assert_eq!(w.wait(w.generation(), None), Wake::Kicked);
        assert!(w.take_kick());
        assert!(!w.take_kick());
    }

    #[test]
    fn a_wake_between_sample_and_sleep_is_not_lost() {
        let w = Waker::default();
        let since = w.generation();
        w.wake();
        assert_eq!(w.wait(since, None), Wake::Woken);
    }

    #[test]
    fn a_sleeping_vcpu_is_woken_by_an_interrupt_or_a_kick_from_another_thread() {
        for kick in [false, true] {
            let w = Arc::new(Waker::default());
            let since = w.generation();
            let other = Arc::clone(&w);
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                if kick {
                    other.kick()
                } else {
                    other.wake()
                }
            });
            let started = Instant::now();
            let woke = w.wait(since, Some(Instant::now() + Duration::from_secs(10)));
            t.join().unwrap();
            assert_eq!(woke, if kick { Wake::Kicked } else { Wake::Woken });
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }

    #[test]
    fn the_deadline_ends_a_quiet_wait() {
        let w = Waker::default();
        let started = Instant::now();
        let woke = w.wait(w.generation(), Some(started + Duration::from_millis(10)));
        assert_eq!(woke, Wake::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(10));
    }

    #[test]
    fn timer_deadlines_from_the_registers() {
        let hz = 24_000_000;
        assert_eq!(timer(0, 100, 0, hz), Timer::Off, "disabled");
        assert_eq!(
            timer(CTL_ENABLE | CTL_IMASK, 100, 0, hz),
            Timer::Off,
            "masked"
        );
        assert_eq!(timer(CTL_ENABLE, 100, 100, hz), Timer::Expired);
        assert_eq!(
            timer(CTL_ENABLE | CTL_ISTATUS, 500, 100, hz),
            Timer::Expired
        );
        assert_eq!(
            timer(CTL_ENABLE, 24_000_000 + 5, 5, hz),
            Timer::In(Duration::from_secs(1))
        );
        assert_eq!(
            timer(CTL_ENABLE, 24_000, 0, hz),
            Timer::In(Duration::from_millis(1))
        );
        assert!(timer_asserted(CTL_ENABLE | CTL_ISTATUS));
        assert!(!timer_asserted(CTL_ENABLE | CTL_ISTATUS | CTL_IMASK));
        assert!(!timer_asserted(CTL_ENABLE));
    }
}
