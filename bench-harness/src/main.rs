//! bench-harness: reproducible side-by-side benchmarks (built in its own issue).
fn main() {
    eprintln!("bench-harness: not built yet (see the bench-harness issue)");
    std::process::exit(2);
}
