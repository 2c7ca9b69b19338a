//! SIGINT / SIGTERM: a flag the shards poll for a graceful shutdown. SIGHUP: a flag the main
//! thread polls to reload the configuration.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

// ---------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------

pub(crate) static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_shutdown_signal(_signal: libc::c_int) {
    // Async-signal-safe: one atomic store.
    SHUTDOWN.store(true, Ordering::SeqCst);
}

pub(crate) static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_reload_signal(_signal: libc::c_int) {
    // Async-signal-safe: one atomic store.
    RELOAD.store(true, Ordering::SeqCst);
}

/// Installs `handler` for `signal` with `flags`.
fn install(
    signal: libc::c_int,
    handler: extern "C" fn(libc::c_int),
    flags: libc::c_int,
) -> io::Result<()> {
    // SAFETY: sigaction is a plain C struct for which all zero bits are valid.
    let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
    action.sa_sigaction = handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = flags;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and every handler passed here only performs an
    // atomic store, which is async-signal-safe; the old action is not requested (null).
    let rc = unsafe { libc::sigaction(signal, &action, core::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs a SIGHUP handler that sets the returned flag (the caller clears it when it
/// reloads). Without it SIGHUP would end the process.
pub fn install_reload_signal() -> io::Result<&'static AtomicBool> {
    install(libc::SIGHUP, on_reload_signal, libc::SA_RESTART)?;
    Ok(&RELOAD)
}

/// Installs SIGINT and SIGTERM handlers that set the returned flag. A second signal of the
/// same kind kills the process (SA_RESETHAND), so an operator can always stop it.
pub fn install_shutdown_signals() -> io::Result<&'static AtomicBool> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        install(signal, on_shutdown_signal, libc::SA_RESETHAND)?;
    }
    Ok(&SHUTDOWN)
}
