//! Runs a test file's checks one after another against one shared environment (clusters and
//! programs: starting them is the slow part), each reported as a test by libtest-mimic.

use std::{future::Future, pin::Pin, process::ExitCode, sync::Arc};

use libtest_mimic::{Arguments, Failed, Trial};
use tokio::sync::Mutex;

use crate::meshlink::Program;

/// One check of the environment `E`.
pub type Check<E> = fn(Arc<E>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Sets up the environment, then runs `checks` in order (one thread: later checks may restart
/// what earlier ones rely on). A failure is reported with the log of the environment's
/// `controller`.
pub fn run<E, S>(
    setup: impl FnOnce() -> S,
    checks: &[(&str, Check<E>)],
    controller: fn(&E) -> &Mutex<Program>,
) -> ExitCode
where
    E: Send + Sync + 'static,
    S: Future<Output = anyhow::Result<E>>,
{
    run_with(setup, checks, move |env: &E| {
        // Called after the check, outside the runtime: blocking here is what awaiting was.
        let log = controller(env).blocking_lock().log_tail();
        format!("--- controller log:\n{log}")
    })
}

/// Like [`run`], for an environment whose failures are best explained by something other than
/// one controller's log: a failed check's message ends with what `context` says.
pub fn run_with<E, S>(
    setup: impl FnOnce() -> S,
    checks: &[(&str, Check<E>)],
    context: impl Fn(&E) -> String + Copy + Send + 'static,
) -> ExitCode
where
    E: Send + Sync + 'static,
    S: Future<Output = anyhow::Result<E>>,
{
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(%e, "no tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    let env = runtime
        .block_on(setup())
        .map(Arc::new)
        .map_err(|e| format!("{e:#}"));
    let trials = checks
        .iter()
        .map(|&(name, check)| {
            let env = env.clone();
            let handle = runtime.handle().clone();
            Trial::test(name, move || {
                let env = env
                    .map_err(|e| Failed::from(format!("setting up the environment failed: {e}")))?;
                handle
                    .block_on(check(env.clone()))
                    .map_err(|e| Failed::from(format!("{e:#}\n{}", context(&env))))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(runtime);
    conclusion.exit_code()
}
