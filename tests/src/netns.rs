//! A Linux network namespace joined to this one by a veth pair, for services that must be
//! partitioned the way a network does it: [`Netns::partition`] makes both ends drop every
//! packet (a `pfifo` queue of length 0), so peers see timeouts, not resets, and TCP
//! resumes by itself when [`Netns::heal`] removes the queues. Needs root and iproute2's
//! `ip` and `tc` (the test command runs as root). Removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A namespace and its veth pair; `host_ip` is this side's address, `ns_ip` the other's.
pub struct Netns {
    pub name: String,
    host_dev: String,
    ns_dev: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Creates a namespace with a /30 of 10.231.0.0/16 of its own; panics with what failed
    /// (a chaos run that cannot partition is not run in part).
    pub fn create() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // A /30 per namespace, from the pid and a counter, so concurrent test processes differ.
        let block = (pid.wrapping_mul(7) + n) % 16_384;
        let base = block * 4;
        let host_ip = Ipv4Addr::new(10, 231, (base >> 8) as u8, (base & 0xff) as u8 + 1);
        let ns_ip = Ipv4Addr::new(10, 231, (base >> 8) as u8, (base & 0xff) as u8 + 2);
        let name = format!("sb{pid}n{n}");
        let (host_dev, ns_dev) = (format!("sbh{pid}{n}"), format!("sbn{pid}{n}"));
        let ns = Netns { name, host_dev, ns_dev, host_ip, ns_ip };
        let (h, d) = (format!("{host_ip}/30"), format!("{ns_ip}/30"));
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &ns.name])?;
            ip(&["link", "add", &ns.host_dev, "type", "veth", "peer", "name", &ns.ns_dev])?;
            ip(&["link", "set", &ns.ns_dev, "netns", &ns.name])?;
            ip(&["addr", "add", &h, "dev", &ns.host_dev])?;
            ip(&["link", "set", &ns.host_dev, "up"])?;
            ip(&["netns", "exec", &ns.name, "ip", "addr", "add", &d, "dev", &ns.ns_dev])?;
            ip(&["netns", "exec", &ns.name, "ip", "link", "set", &ns.ns_dev, "up"])?;
            ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])
        };
        if let Err(e) = setup() {
            panic!("network namespace {}: {e} (needs root and iproute2)", ns.name);
        }
        ns
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.name.clone()]
    }

    /// Both ends drop every packet.
    pub fn partition(&self) {
        run("tc", &["qdisc", "add", "dev", &self.host_dev, "root", "pfifo", "limit", "0"]).expect("drop on this side");
        ip(&["netns", "exec", &self.name, "tc", "qdisc", "add", "dev", &self.ns_dev, "root", "pfifo", "limit", "0"])
            .expect("drop on the namespace's side");
    }

    /// Packets pass again.
    pub fn heal(&self) {
        let _ = run("tc", &["qdisc", "del", "dev", &self.host_dev, "root"]);
        let _ = ip(&["netns", "exec", &self.name, "tc", "qdisc", "del", "dev", &self.ns_dev, "root"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_dev]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Removes namespaces (and their veth pairs) left by test processes that are gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix("sb").and_then(|r| r.split('n').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let n = &name[format!("sb{pid}n").len()..];
            let _ = ip(&["link", "del", &format!("sbh{pid}{n}")]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}
