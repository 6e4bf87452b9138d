//! Network namespaces made by a test: a namespace joined to this one by a
//! veth pair on a private 10.x subnet, removed when dropped.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace with one veth link to the test's namespace.
pub struct Netns {
    pub name: String,
    /// This side's address on the link.
    pub host_ip: Ipv4Addr,
    /// The namespace's address on the link.
    pub ns_ip: Ipv4Addr,
    host_if: String,
}

fn run(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("command runs");
    assert!(status.success(), "{args:?} failed");
}

impl Netns {
    /// Creates `cocoon-PID-N` with 10.213.X.2 inside and 10.213.X.1 here.
    pub fn create() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("cocoon-{pid}-{n}");
        // A subnet unique per process and namespace.
        let subnet = ((pid % 200) as u8).wrapping_add(n as u8 * 7);
        let host_if = format!("cvh{}x{n}", pid % 100_000);
        let ns_if = format!("cvn{}x{n}", pid % 100_000);
        let host_ip = Ipv4Addr::new(10, 213, subnet, 1);
        let ns_ip = Ipv4Addr::new(10, 213, subnet, 2);
        quietly(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name]);
        let netns = Self {
            name,
            host_ip,
            ns_ip,
            host_if,
        };
        run(&[
            "ip",
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ]);
        run(&["ip", "link", "set", &ns_if, "netns", &netns.name]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &netns.host_if,
        ]);
        run(&["ip", "link", "set", &netns.host_if, "up"]);
        netns.exec(&["ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if]);
        netns.exec(&["ip", "link", "set", &ns_if, "up"]);
        netns.exec(&["ip", "link", "set", "lo", "up"]);
        netns
    }

    /// Runs a command inside the namespace and checks it succeeded.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run(&all);
    }

    /// Routes everything from the namespace through this side of the link
    /// (Chromium leaves host candidates out until a default route exists).
    pub fn default_route(&self) {
        self.exec(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &self.host_ip.to_string(),
        ]);
    }

    /// Drops all UDP in and out of the namespace (TCP still flows).
    pub fn block_udp(&self) {
        self.udp_drop_rule("-I", &[]);
    }

    /// Lets UDP through again.
    pub fn unblock_udp(&self) {
        self.udp_drop_rule("-D", &[]);
    }

    /// Drops UDP datagrams of 300 bytes and more (IP length) in and out of
    /// the namespace: ICE's STUN checks pass, DTLS's certificate flight
    /// does not.
    pub fn block_large_udp(&self) {
        self.udp_drop_rule("-I", LARGE_UDP);
    }

    /// Lets large UDP datagrams through again.
    pub fn unblock_large_udp(&self) {
        self.udp_drop_rule("-D", LARGE_UDP);
    }

    /// Inserts (`-I`) or deletes (`-D`) a rule dropping UDP, narrowed by
    /// `matching`, on the way in and out.
    fn udp_drop_rule(&self, action: &str, matching: &[&str]) {
        for chain in ["INPUT", "OUTPUT"] {
            let mut args = vec!["iptables", action, chain, "-p", "udp"];
            args.extend_from_slice(matching);
            args.extend_from_slice(&["-j", "DROP"]);
            self.exec(&args);
        }
    }
}

/// The match for [`Netns::block_large_udp`].
const LARGE_UDP: &[&str] = &["-m", "length", "--length", "300:65535"];

/// Runs a best-effort clean-up command, ignoring whether it worked.
fn quietly(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and so the pair.
        quietly(&["ip", "netns", "del", &self.name]);
        quietly(&["ip", "link", "del", &self.host_if]);
    }
}
