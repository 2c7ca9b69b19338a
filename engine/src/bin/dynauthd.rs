//! dynauthd: the Dynauth server. The shard-per-core UDP runtime is built in its own issue; until
//! then this binary only reports that it is not yet available.
fn main() {
    eprintln!("dynauthd: the UDP runtime is not built yet (see the runtime issue)");
    std::process::exit(2);
}
