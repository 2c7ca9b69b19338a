//! The real `dynauthd` for loadgen's end-to-end tests. It is another package's binary:
//! `cargo test --workspace` builds it into the same target folder as these tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The dynauthd binary beside this test's.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = dir.join("dynauthd");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --workspace` or `cargo build --bin dynauthd` first",
        bin.display()
    );
    bin
}

/// A child process, killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts dynauthd with `args`; returns it and the first 127.0.0.1 address of its banner.
pub fn start(args: &[&str]) -> (Killed, String) {
    let (child, addr, _) = start_with_banner(args);
    (child, addr)
}

/// [`start`], with the whole banner line too (it names `metrics=ADDR` and the like).
pub fn start_with_banner(args: &[&str]) -> (Killed, String, String) {
    let mut child = Command::new(binary())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    let addr = banner
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no listen address in {banner:?}"))
        .to_string();
    (Killed(child), addr, banner)
}
