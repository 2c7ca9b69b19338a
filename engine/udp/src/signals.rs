//! SIGINT / SIGTERM: a flag the shards poll for a graceful shutdown.

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

/// Installs SIGINT and SIGTERM handlers that set the returned flag. A second signal of the
/// same kind kills the process (SA_RESETHAND), so an operator can always stop it.
pub fn install_shutdown_signals() -> io::Result<&'static AtomicBool> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction is a plain C struct for which all zero bits are valid.
        let mut action: libc::sigaction = unsafe { core::mem::zeroed() };
        action.sa_sigaction =
            on_shutdown_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESETHAND;
        // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is fully initialised and its handler only performs an atomic store,
        // which is async-signal-safe; the old action is not requested (null).
        let rc = unsafe { libc::sigaction(signal, &action, core::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(&SHUTDOWN)
}
