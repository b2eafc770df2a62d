//! The session cap from the process's own limits: open files (`server.rs`) and
//! the memory its cgroup allows. The lower cap wins, so a pod is never OOM-killed
//! before its gateway starts answering 503: the memory cap keeps [`BASE_RESERVE`]
//! for the process itself, then gives each session its budget (`--memory-per-session`,
//! default [`DEFAULT_PER_SESSION`]) out of [`USABLE_SHARE`] of the rest.

use std::path::Path;

/// Memory kept for everything but sessions (runtime, buffers, gRPC, metrics).
pub const BASE_RESERVE: u64 = 64 << 20;
/// Share of the memory after the reserve that sessions may use (the rest is headroom
/// for bursts: queued frames, read buffers of frames in flight).
pub const USABLE_SHARE: f64 = 0.8;
/// Default memory budget per session: about twice an idle authenticated session with
/// a subscription (3.7 KB measured, docs/performance.md), for queues and buffers.
pub const DEFAULT_PER_SESSION: u64 = 8192;

/// What an HTTP/1.1 connection kept open by hyper holds beyond a WebSocket session's
/// state: its read buffer and its buffer for response heads, 8 KiB each (hyper's
/// `INIT_BUFFER_SIZE`). An SSE stream and a waiting poll pay it; an upgraded WebSocket
/// session does not (docs/performance.md, "Fallback transports").
pub const HTTP_CONNECTION_BYTES: u64 = 16 << 10;

/// Session slots an SSE stream or a waiting poll takes of a cap set by memory at
/// `per_session` bytes per slot (a WebSocket session takes one).
pub fn http_session_weight(per_session: u64) -> usize {
    // At least 1 KiB per slot: a smaller `--memory-per-session` is not a reason for one
    // stream to take thousands of slots.
    let per = per_session.max(1024);
    (per + HTTP_CONNECTION_BYTES).div_ceil(per) as usize
}

/// Sessions a memory limit allows at `per_session` bytes each.
pub fn sessions_for_memory(limit: u64, per_session: u64) -> usize {
    let usable = limit.saturating_sub(BASE_RESERVE) as f64 * USABLE_SHARE;
    ((usable / per_session.max(1) as f64) as usize).max(4)
}

/// A cgroup memory limit file's value: `None` for no limit (`max`, or v1's huge number).
pub fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    // cgroup v1 reports "no limit" as a page-rounded i64::MAX.
    (v < 1 << 60).then_some(v)
}

/// The memory limit of this process's cgroup under `root` (normally `/sys/fs/cgroup`):
/// cgroup v2 (`memory.max` of the process's own group, then of the root) or v1.
pub fn cgroup_memory_limit(root: &Path) -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(|p| p.trim_start_matches('/').to_owned())));
    let mut candidates = Vec::new();
    if let Some(own) = own.filter(|p| !p.is_empty()) {
        candidates.push(root.join(own).join("memory.max"));
    }
    candidates.push(root.join("memory.max"));
    candidates.push(root.join("memory").join("memory.limit_in_bytes"));
    candidates.iter().filter_map(|p| std::fs::read_to_string(p).ok()).find_map(|t| parse_limit(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_caps() {
        // 512 MiB: (512 - 64) MiB * 0.8 / 8 KiB.
        assert_eq!(sessions_for_memory(512 << 20, 8192), 45_875);
        assert_eq!(sessions_for_memory(2 << 30, 8192), 203_161);
        assert_eq!(sessions_for_memory(1 << 20, 8192), 4, "never below a handful");
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("536870912\n"), Some(536_870_912));
        assert_eq!(parse_limit("9223372036854771712"), None);
        assert_eq!(parse_limit("garbage"), None);
    }

    #[test]
    fn reads_v2_and_v1_files() {
        let dir = std::env::temp_dir().join(format!("sb-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("memory")).unwrap();
        std::fs::write(dir.join("memory").join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir), Some(1 << 30));
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir), Some(1 << 30), "v2 without a limit falls through to v1");
        std::fs::write(dir.join("memory.max"), "268435456\n").unwrap();
        assert_eq!(cgroup_memory_limit(&dir), Some(256 << 20));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
