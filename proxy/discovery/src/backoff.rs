//! The backoff between attempts of a control-plane stream, and between connection attempts to
//! an endpoint that failed (the sidecar's balancer): Linkerd's reconnect bounds.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Linkerd's reconnect backoff bounds (`…_CONNECT_EXP_BACKOFF_{MIN,MAX}`, outbound: 100 ms–60 s),
/// with jitter so that the proxies of a cluster do not all call back at once after a
/// control-plane restart. backon's jitter adds up to the current delay, so the delay doubles
/// from MIN up to MAX / 2 and every delay, jitter included, lies within MIN..=MAX.
pub const MIN: Duration = Duration::from_millis(100);
pub const MAX: Duration = Duration::from_secs(60);

/// The delays between attempts, for ever. A stream that answered starts a new one, so that a
/// failure after a long healthy stream is retried quickly.
#[derive(Debug)]
pub struct Backoff(backon::ExponentialBackoff);

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Self(
            ExponentialBuilder::new()
                .with_min_delay(MIN)
                .with_max_delay(MAX / 2)
                .with_jitter()
                .without_max_times()
                .build(),
        )
    }

    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        // Without a maximum number of attempts the iterator never ends; MAX is only a fallback.
        self.0.next().unwrap_or(MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_the_minimum_to_the_maximum_with_jitter() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        // Jitter adds up to the current delay.
        assert!((MIN..=MIN * 2).contains(&first), "{first:?}");
        let later: Vec<_> = (0..40).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= MAX), "{later:?}");
        assert!(later.last().is_some_and(|d| *d >= MAX / 2), "{later:?}");
        b.reset();
        assert!(b.next_delay() <= MIN * 2);
    }
}
