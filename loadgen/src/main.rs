//! loadgen: the DAC load generator (built in its own issue).
fn main() {
    eprintln!("loadgen: not built yet (see the loadgen issue)");
    std::process::exit(2);
}
