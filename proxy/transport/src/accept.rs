//! `accept` with back-off: the one place every listener waits for its next connection.

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};

/// The first wait after a failed `accept` (EMFILE, ENFILE, ENOMEM, ...). The condition passes
/// only when connections close, so retrying at once would spin a core and flood the log (1.2
/// million lines in 30 s were seen on the admin port); a short first wait keeps a brief
/// shortage brief.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest wait: the time a listener may stay deaf after the shortage ends.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The next connection of `listener`. A failed `accept` is logged once per back-off period
/// (with how many failed in a row) and retried after a wait that doubles from
/// [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`].
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    accept_with(|| listener.accept()).await
}

async fn accept_with<T, F, Fut>(mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    let mut failures = 0u32;
    loop {
        match accept().await {
            Ok(accepted) => {
                if failures > 0 {
                    tracing::info!(failures, "accepting connections again");
                }
                return accepted;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures);
                tracing::warn!(%error, failures, backoff = ?wait, "accept failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The wait after the `failures`-th failure in a row.
fn backoff(failures: u32) -> Duration {
    ACCEPT_BACKOFF_MIN
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(ACCEPT_BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, io};

    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let cases = [
            (1, Duration::from_millis(10)),
            (2, Duration::from_millis(20)),
            (3, Duration::from_millis(40)),
            (7, Duration::from_millis(640)),
            (8, ACCEPT_BACKOFF_MAX),
            (u32::MAX, ACCEPT_BACKOFF_MAX),
        ];
        for (failures, wait) in cases {
            assert_eq!(backoff(failures), wait, "{failures}");
        }
    }

    /// An `accept` that fails at once (EMFILE) is retried after a wait, not in a loop: 30
    /// failures take the sum of their back-offs, and each is one log line.
    #[tokio::test(start_paused = true)]
    async fn failures_back_off() {
        let calls = Cell::new(0u32);
        let start = tokio::time::Instant::now();
        let got = accept_with(|| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n <= 30 {
                    Err(io::Error::from_raw_os_error(24)) // EMFILE
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got, 31);
        let waited = start.elapsed();
        let expected: Duration = (1..=30).map(backoff).sum();
        assert!(
            waited >= expected,
            "waited {waited:?}, expected {expected:?}"
        );
        assert!(expected > Duration::from_secs(20));
    }
}
