//! The machine's memory, for refusing work that cannot fit before allocating it.

/// Bytes of memory available to a new allocation without swapping (`MemAvailable` of
/// /proc/meminfo); `None` where the system does not say.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// `n` bytes for a message: "9.3 GiB", "512.0 MiB".
pub fn human(n: u64) -> String {
    let n = n as f64;
    if n >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", n / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", n / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn available_memory_is_known_on_linux() {
        if cfg!(target_os = "linux") {
            let n = super::available_bytes().unwrap();
            assert!(n > 1 << 20, "{n}");
        }
        assert_eq!(super::human(3 << 29), "1.5 GiB");
        assert_eq!(super::human(1 << 20), "1.0 MiB");
    }
}
