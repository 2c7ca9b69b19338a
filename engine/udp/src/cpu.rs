//! CPU lists (`--cpus 0,2-5`), shared by dynauthd, loadgen and the bench-harness: a small
//! pure type that lives here, below all three, so that no tool imports it from the server.
//!
//! Owns: parsing and de-duplicating CPU lists. Must not touch: pinning threads (the callers
//! do that with `core_affinity`).
#![forbid(unsafe_code)]

use core::str::FromStr;

use serde::Deserialize;

/// `--cpus 0,2-5`: a sorted, de-duplicated CPU list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

impl FromStr for CpuList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cpus = Vec::new();
        for part in s.split(',').map(str::trim) {
            let num = |t: &str| {
                t.trim().parse::<usize>().map_err(|_| {
                    format!("`{t}` in CPU list `{s}` is not a CPU number (e.g. 0,2-5)")
                })
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(format!("CPU range `{part}` runs backwards"));
                    }
                    if b - a > 4096 {
                        return Err(format!("CPU range `{part}` is too large"));
                    }
                    cpus.extend(a..=b);
                }
                None => cpus.push(num(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.is_empty() {
            return Err("the CPU list is empty".into());
        }
        Ok(CpuList(cpus))
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_sorted_and_deduplicated() {
        assert_eq!("0,2-5".parse::<CpuList>().unwrap().0, vec![0, 2, 3, 4, 5]);
        assert_eq!("3,1,1".parse::<CpuList>().unwrap().0, vec![1, 3]);
        assert!("5-2".parse::<CpuList>().is_err());
        assert!("a".parse::<CpuList>().is_err());
        assert!("".parse::<CpuList>().is_err());
    }
}
