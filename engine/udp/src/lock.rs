//! Exclusive advisory locks on files (`flock(2)`): one dynauthd per state directory.
//!
//! Owns: the one `flock` call. Must not touch: what the file holds.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Takes an exclusive lock on `file` without waiting. `Ok(false)`: another open file
/// description holds it (another process). The lock lasts until every descriptor of this
/// open file description is closed (a `try_clone` shares it).
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: `flock` takes a file descriptor and flags and touches no memory of ours; the
    // descriptor is valid for the duration of the call because `file` is borrowed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_of_a_locked_file_is_refused_until_the_first_closes() {
        let path = std::env::temp_dir().join(format!("dynauth-lock-{}", std::process::id()));
        let first = File::create(&path).unwrap();
        assert!(try_lock_exclusive(&first).unwrap());
        let shared = first.try_clone().unwrap();
        let second = File::options().write(true).open(&path).unwrap();
        assert!(!try_lock_exclusive(&second).unwrap(), "held by the first");
        drop(first);
        assert!(!try_lock_exclusive(&second).unwrap(), "a clone keeps it");
        drop(shared);
        assert!(
            try_lock_exclusive(&second).unwrap(),
            "free once all are closed"
        );
        let _ = std::fs::remove_file(&path);
    }
}
