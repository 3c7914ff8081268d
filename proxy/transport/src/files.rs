//! The open-file limit, and how many connections fit under it.
//!
//! Every connection is a file descriptor (a forwarded one two: the client's and the
//! endpoint's). A process that meets its open-file limit before its connection limit fails in
//! the worst way: `accept` fails for everyone (the admin port's probes and the certificate
//! renewal included) instead of one more client being refused. So the limit is raised to the
//! hard limit at start, and the connection limit is fitted below it with room to spare.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Raises the soft open-file limit to the hard limit; returns the limit now in force (`None`
/// when it cannot be read).
pub fn raise_open_file_limit() -> Option<u64> {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => Some(hard),
            Err(error) => {
                tracing::warn!(%error, soft, hard, "could not raise the open-file limit");
                Some(soft)
            }
        },
        Ok((soft, _)) => Some(soft),
        Err(error) => {
            tracing::warn!(%error, "could not read the open-file limit");
            None
        }
    }
}

/// `requested` connections, or fewer when they would not fit the open-file limit (raised to
/// the hard limit first; see [`fit_connections`]); lowering it is logged.
pub fn fit_connections_to_limit(
    requested: usize,
    files_per_connection: u64,
    reserved: u64,
) -> usize {
    let Some(files) = raise_open_file_limit() else {
        return requested;
    };
    let fit = fit_connections(requested, files, files_per_connection, reserved);
    if fit < requested {
        tracing::warn!(
            requested,
            allowed = fit,
            open_files = files,
            files_per_connection,
            reserved,
            "connection limit lowered to fit the open-file limit"
        );
    }
    fit
}

/// How many connections of `files_per_connection` descriptors each fit under `open_files`
/// once `reserved` descriptors are set aside (the admin server's connections, certificate
/// renewal, the API watch, logs, libraries): `requested`, or fewer when that would not fit.
pub fn fit_connections(
    requested: usize,
    open_files: u64,
    files_per_connection: u64,
    reserved: u64,
) -> usize {
    let fit = open_files.saturating_sub(reserved) / files_per_connection.max(1);
    usize::try_from(fit).map_or(requested, |fit| requested.min(fit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_under_the_file_limit() {
        // (requested, open files, per connection, reserved) -> allowed
        let cases = [
            // The usual container limit: everything asked for fits.
            (10_000, 1_048_576, 2, 256, 10_000),
            // A default soft limit of 1024 that could not be raised.
            (10_000, 1024, 2, 256, 384),
            // A limit below the reserve: nothing is forwarded rather than everything failing.
            (10_000, 100, 2, 256, 0),
            (5, 1024, 2, 256, 5),
            (10_000, 20_000, 2, 256, 9_872),
        ];
        for (requested, files, per, reserved, allowed) in cases {
            assert_eq!(
                fit_connections(requested, files, per, reserved),
                allowed,
                "{requested} under {files}"
            );
        }
    }
}
