//! systemd's service notifications for `Type=notify` units: READY once `run`
//! is up, STATUS lines, WATCHDOG keep-alives and STOPPING, over the datagram
//! socket named by `NOTIFY_SOCKET`.
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is unset (not under systemd, or
//! a unit of another type). A notification that cannot be sent is logged
//! once and otherwise ignored: systemd's own timeouts then say what went
//! wrong, and polling never stops over it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// The notifications of one `run`.
pub struct Notifier {
    /// `NOTIFY_SOCKET` is set.
    enabled: bool,
    /// `WATCHDOG_USEC`, when it is set for this process.
    watchdog: Option<Duration>,
    /// A failed send was logged already.
    warned: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (a watchdog
    /// meant for another process is not this one's).
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        Notifier {
            enabled,
            watchdog: sd_notify::watchdog_enabled().filter(|d| enabled && !d.is_zero()),
            warned: AtomicBool::new(false),
        }
    }

    /// Whether anything is sent at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// How often to send WATCHDOG=1: half of `WATCHDOG_USEC`, as sd_notify(3)
    /// recommends; `None` without a watchdog.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// STATUS=: one line that `systemctl status` shows.
    pub fn status(&self, text: &str) {
        let text = one_line(text);
        self.send(&[NotifyState::Status(&text)]);
    }

    /// Still starting: EXTEND_TIMEOUT_USEC (systemd waits at least `by` more
    /// before it gives up on the start), with a STATUS line saying why.
    pub fn starting(&self, by: Duration, text: &str) {
        let text = one_line(text);
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[
            NotifyState::ExtendTimeoutUsec(usec),
            NotifyState::Status(&text),
        ]);
    }

    /// READY=1, with a STATUS line.
    pub fn ready(&self, text: &str) {
        let text = one_line(text);
        self.send(&[NotifyState::Ready, NotifyState::Status(&text)]);
    }

    /// WATCHDOG=1 (only when a watchdog is set).
    pub fn feed_watchdog(&self) {
        if self.watchdog.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// STOPPING=1, with a STATUS line.
    pub fn stopping(&self, text: &str) {
        let text = one_line(text);
        self.send(&[NotifyState::Stopping, NotifyState::Status(&text)]);
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(error) = sd_notify::notify(states) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %error, "cannot notify systemd (NOTIFY_SOCKET); polling goes on");
            }
        }
    }
}

/// A STATUS value is one line of the datagram: newlines would end it.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_stays_on_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }

    #[test]
    fn a_disabled_notifier_sends_nothing_and_has_no_watchdog() {
        let notifier = Notifier {
            enabled: false,
            watchdog: None,
            warned: AtomicBool::new(false),
        };
        notifier.ready("x");
        notifier.feed_watchdog();
        assert!(!notifier.enabled());
        assert_eq!(notifier.watchdog_period(), None);
        assert!(!notifier.warned.load(Ordering::Relaxed));
    }
}
