//! Transparent interception: the `nat` table rules that send a pod's TCP
//! through its sidecar, as `weft init-iptables` installs them in the pod's
//! network namespace.
//!
//! - [`Spec`]: what to redirect and what to leave alone (the proxy's UID,
//!   its ports, skipped ports and CIDRs).
//! - [`rules`]: the rule set as `iptables-restore` input (pure, unit-tested).
//! - [`install`] / [`uninstall`]: apply it with Debian's `iptables` tools.
//!
//! Every rule lives in weft's own chains ([`CHAINS`]), reached by one jump
//! from each built-in chain, so uninstalling removes exactly those jumps and
//! chains and nothing another tool added. Installing first uninstalls, so
//! running it twice leaves one copy.
//!
//! Only IPv4 is intercepted (`iptables`, not `ip6tables`): IPv6 traffic
//! keeps its direct path (no mTLS, no `registryOnly`), since the sidecar's
//! listeners are IPv4. An IPv6 skip CIDR would therefore exempt nothing and
//! is refused ([`InterceptError::Ipv6Cidr`]) rather than silently ignored.
//!
//! Only a connection's first packet (its SYN) is redirected: connections
//! already open when the rules are installed (in a namespace that had no
//! connection tracking before, the kernel picks them up mid-stream as new
//! flows) keep going where they went. Installed before the app and the
//! sidecar start, as an init step, there are none.
//!
//! The rules (nat table; REDIRECT sends locally made packets to 127.0.0.1
//! and arriving packets to the arriving interface's address, keeping the
//! original destination for `SO_ORIGINAL_DST`):
//!
//! ```text
//! PREROUTING  -p tcp -j WEFT_INBOUND
//! WEFT_INBOUND  ! --syn  RETURN                  (connections open before the rules)
//! WEFT_INBOUND  --dport <inbound port>  RETURN    (peers' mTLS lands directly)
//! WEFT_INBOUND  --dport <skipped port>  RETURN
//! WEFT_INBOUND  -p tcp  REDIRECT --to-ports <inbound port>
//! OUTPUT      -p tcp -j WEFT_OUTPUT
//! WEFT_OUTPUT  ! --syn  RETURN                   (connections open before the rules)
//! WEFT_OUTPUT  -o lo  RETURN                      (loopback: the sidecar itself, the pod's own ports)
//! WEFT_OUTPUT  --uid-owner <proxy uid>  RETURN    (the sidecar's own connections)
//! WEFT_OUTPUT  --dport <skipped port>  RETURN
//! WEFT_OUTPUT  -d <skipped cidr>  RETURN
//! WEFT_OUTPUT  -j WEFT_REDIRECT
//! WEFT_REDIRECT  -p tcp  REDIRECT --to-ports <outbound port>
//! ```

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Command;

/// weft's chains in the nat table.
pub const INBOUND_CHAIN: &str = "WEFT_INBOUND";
pub const OUTPUT_CHAIN: &str = "WEFT_OUTPUT";
pub const REDIRECT_CHAIN: &str = "WEFT_REDIRECT";
/// Every chain weft adds, in the order they are removed.
pub const CHAINS: [&str; 3] = [INBOUND_CHAIN, OUTPUT_CHAIN, REDIRECT_CHAIN];
/// The jumps from built-in chains into weft's: `(built-in chain, rule spec)`.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)];

/// An IPv4 or IPv6 network, `address/prefix` (prefix 0..=32 or 0..=128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Why a `--skip-outbound-cidrs` entry is not a CIDR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a CIDR: expected ADDRESS/PREFIX, e.g. 10.0.0.0/8 (prefix at most 32 for IPv4, 128 for IPv6)")]
pub struct CidrError(pub String);

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let bad = || CidrError(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// The network's first address (the address with its host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }
}

/// Why a comma-separated list (a `weft init-iptables` flag, or the
/// `weft.dev/skip-*` annotation `weft inject` turns into one) is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListError {
    /// `1,,2`, `22,`, `,22`: usually a value missing from a generated list.
    #[error("item {position} of {list:?} is empty: expected values separated by single commas, e.g. 15020,22")]
    EmptyItem { list: String, position: usize },
    #[error("{0:?} is not a port: a port is 1-65535")]
    Port(String),
    #[error(transparent)]
    Cidr(#[from] CidrError),
    /// `10.0.0.1/8`: the rule would match the network, not the address written.
    #[error("{given} has host bits set: the network is {network}; write that (or a /32 for one address)")]
    HostBits { given: Cidr, network: Cidr },
    /// `a,b,a`: in a list whose items must be distinct (e.g. control-plane
    /// replicas), a repeat is usually a copy-paste slip.
    #[error("item {position} of {list:?} repeats {item:?} (item {first}): list each value once")]
    Duplicate { list: String, item: String, position: usize, first: usize },
}

/// The items of a comma-separated list (each trimmed); empty or blank is no
/// items, an empty item is refused by its position (1-based). The one list
/// syntax of weft's flags (`weft init-iptables`, `--control-plane`, ...).
///
/// # Errors
/// [`ListError::EmptyItem`] (`1,,2`, `22,`, `,22`).
pub fn list_items(s: &str) -> Result<Vec<&str>, ListError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<&str> = s.split(',').map(str::trim).collect();
    match items.iter().position(|i| i.is_empty()) {
        Some(i) => Err(ListError::EmptyItem { list: s.to_string(), position: i + 1 }),
        None => Ok(items),
    }
}

/// Like [`list_items`], and every item must be distinct.
///
/// # Errors
/// [`ListError::EmptyItem`], or [`ListError::Duplicate`] naming the repeat
/// and both positions (1-based).
pub fn distinct_list_items(s: &str) -> Result<Vec<&str>, ListError> {
    let items = list_items(s)?;
    for (i, item) in items.iter().enumerate() {
        if let Some(first) = items[..i].iter().position(|x| x == item) {
            return Err(ListError::Duplicate {
                list: s.to_string(),
                item: item.to_string(),
                position: i + 1,
                first: first + 1,
            });
        }
    }
    Ok(items)
}

/// A comma-separated list of ports (1-65535), e.g. `15020,22`, without
/// repeats (the first occurrence's order kept). Shared by `weft
/// init-iptables` and `weft inject`, so the injector refuses what the init
/// step would.
///
/// # Errors
/// [`ListError::EmptyItem`] or [`ListError::Port`].
pub fn parse_ports(s: &str) -> Result<Vec<u16>, ListError> {
    let mut ports = Vec::new();
    for p in list_items(s)? {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(ListError::Port(p.to_string())),
            Ok(n) if !ports.contains(&n) => ports.push(n),
            Ok(_) => {}
        }
    }
    Ok(ports)
}

/// A comma-separated list of CIDRs (`ADDRESS/PREFIX`), e.g.
/// `10.0.0.0/8,169.254.169.254/32`, without repeats; a CIDR with host bits
/// set is refused, naming its network.
///
/// # Errors
/// [`ListError::EmptyItem`], [`ListError::Cidr`] or [`ListError::HostBits`].
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, ListError> {
    let mut cidrs = Vec::new();
    for c in list_items(s)? {
        let given: Cidr = c.parse()?;
        let network = Cidr { addr: given.network(), prefix: given.prefix };
        if network != given {
            return Err(ListError::HostBits { given, network });
        }
        if !cidrs.contains(&given) {
            cidrs.push(given);
        }
    }
    Ok(cidrs)
}

/// What to intercept: flags of `weft init-iptables`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The UID the sidecar runs as; its own connections are never redirected.
    pub proxy_uid: u32,
    /// The sidecar's inbound (mTLS) port: arriving TCP is redirected here.
    pub inbound_port: u16,
    /// The sidecar's outbound port: the pod's outgoing TCP is redirected here.
    pub outbound_port: u16,
    /// Arriving TCP to these ports reaches the app directly.
    pub skip_inbound_ports: Vec<u16>,
    /// Outgoing TCP to these ports leaves directly.
    pub skip_outbound_ports: Vec<u16>,
    /// Outgoing TCP to these networks leaves directly (IPv6 ones are no-ops).
    pub skip_outbound_cidrs: Vec<Cidr>,
}

/// Why the rules could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(
        "weft init-iptables must run as root (uid 0; in Kubernetes, the init container with NET_ADMIN), not uid {0}"
    )]
    NotRoot(u32),
    // Not `source`: the cause is in the message once, not repeated by error chains.
    #[error("cannot run {tool}: {error}; install Debian's iptables package (apt-get install iptables)")]
    Missing { tool: &'static str, error: std::io::Error },
    #[error(
        "{command} was denied: this process is root but lacks the NET_ADMIN capability (in Kubernetes, add NET_ADMIN and NET_RAW to the init container's securityContext.capabilities; elsewhere run it with CAP_NET_ADMIN, e.g. not inside a container that drops it)"
    )]
    NoNetAdmin { command: String },
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: std::process::ExitStatus, stderr: String },
    #[error("--inbound-port and --outbound-port must differ and be non-zero (got {inbound} and {outbound})")]
    Ports { inbound: u16, outbound: u16 },
    #[error(
        "--skip-outbound-cidrs {0}: an IPv6 network, but only IPv4 is intercepted (IPv6 connections already leave directly); remove it"
    )]
    Ipv6Cidr(Cidr),
}

impl Spec {
    /// What makes a rule set unusable whether installed or printed: a zero
    /// port, inbound and outbound on one port (each would catch the other),
    /// or an IPv6 skip CIDR (nothing IPv6 is intercepted, so it would do nothing).
    pub fn check(&self) -> Result<(), InterceptError> {
        if self.inbound_port == 0 || self.outbound_port == 0 || self.inbound_port == self.outbound_port {
            return Err(InterceptError::Ports { inbound: self.inbound_port, outbound: self.outbound_port });
        }
        if let Some(c) = self.skip_outbound_cidrs.iter().find(|c| c.addr.is_ipv6()) {
            return Err(InterceptError::Ipv6Cidr(*c));
        }
        Ok(())
    }
}

/// The rule set for `spec` as `iptables-restore --noflush` input (nat
/// table). Declaring a chain flushes it, so restoring twice gives one copy of
/// every rule in weft's chains; the jumps are removed first by [`install`].
pub fn rules(spec: &Spec) -> String {
    let mut s = String::from("*nat\n");
    for chain in CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for (builtin, chain) in JUMPS {
        let _ = writeln!(s, "-A {builtin} {}", jump_spec(chain).join(" "));
    }
    // Only a connection's first packet (a SYN) is redirected. The nat table
    // sees the first packet of each tracked flow, and a namespace that had no
    // conntrack before these rules picks up connections already open as new
    // flows at their next packet: redirected, they would be reset by the
    // sidecar's port (the sidecar's own config stream among them).
    let _ = writeln!(s, "-A {INBOUND_CHAIN} -p tcp ! --syn -j RETURN");
    let _ = writeln!(s, "-A {INBOUND_CHAIN} -p tcp --dport {} -j RETURN", spec.inbound_port);
    for p in &spec.skip_inbound_ports {
        let _ = writeln!(s, "-A {INBOUND_CHAIN} -p tcp --dport {p} -j RETURN");
    }
    let _ = writeln!(s, "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}", spec.inbound_port);
    let _ = writeln!(s, "-A {OUTPUT_CHAIN} -p tcp ! --syn -j RETURN");
    let _ = writeln!(s, "-A {OUTPUT_CHAIN} -o lo -j RETURN");
    let _ = writeln!(s, "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN", spec.proxy_uid);
    for p in &spec.skip_outbound_ports {
        let _ = writeln!(s, "-A {OUTPUT_CHAIN} -p tcp --dport {p} -j RETURN");
    }
    for c in spec.skip_outbound_cidrs.iter().filter(|c| c.addr.is_ipv4()) {
        let _ = writeln!(s, "-A {OUTPUT_CHAIN} -d {c} -j RETURN");
    }
    let _ = writeln!(s, "-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}");
    let _ = writeln!(s, "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}", spec.outbound_port);
    s.push_str("COMMIT\n");
    s
}

/// The match of a jump from a built-in chain into `chain`.
fn jump_spec(chain: &str) -> [&str; 4] {
    ["-p", "tcp", "-j", chain]
}

/// What [`uninstall`] removes (or would): `iptables` arguments, one
/// invocation each, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    pub steps: Vec<Vec<String>>,
}

impl Removal {
    /// True when no weft jump or chain is there.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The steps as `iptables …` command lines.
    pub fn commands(&self) -> Vec<String> {
        self.steps.iter().map(|s| format!("iptables {}", s.join(" "))).collect()
    }
}

/// The `iptables` invocations that remove weft's rules from the nat table
/// listed in `nat_rules` (`iptables -t nat -S`): every jump into a weft chain
/// from another chain (as often as it is there), then each weft chain
/// present is flushed and deleted. Nothing for a table without them.
pub fn removal(nat_rules: &str) -> Removal {
    let arg = |s: &str| s.to_string();
    let mut steps = Vec::new();
    for line in nat_rules.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [op, from, .., j, to] = words.as_slice() else { continue };
        if *op == "-A" && *j == "-j" && CHAINS.contains(to) && !CHAINS.contains(from) {
            let mut step: Vec<String> = ["-w", "-t", "nat", "-D"].map(arg).to_vec();
            step.extend(words[1..].iter().map(|w| arg(w)));
            steps.push(step);
        }
    }
    let present: Vec<&str> =
        CHAINS.into_iter().filter(|c| nat_rules.lines().any(|l| l.trim() == format!("-N {c}"))).collect();
    for op in ["-F", "-X"] {
        for chain in &present {
            steps.push(["-w", "-t", "nat", op, chain].map(arg).to_vec());
        }
    }
    Removal { steps }
}

/// What [`uninstall`] would remove from this network namespace now.
///
/// # Errors
/// Not root, `iptables` missing, or it could not list the nat table.
pub fn planned_removal() -> Result<Removal, InterceptError> {
    require_root()?;
    Ok(removal(&iptables(&["-w", "-t", "nat", "-S"])?))
}

/// Removes weft's rules and chains (and only those); what it removed, empty
/// when there were none.
///
/// # Errors
/// Not root, `iptables` missing, or a removal failed (iptables' words).
pub fn uninstall() -> Result<Removal, InterceptError> {
    let plan = planned_removal()?;
    for step in &plan.steps {
        iptables(&step.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(plan)
}

/// Runs `iptables args`; its standard output.
fn iptables(args: &[&str]) -> Result<String, InterceptError> {
    let out = Command::new("iptables")
        .args(args)
        .output()
        .map_err(|error| InterceptError::Missing { tool: "iptables", error })?;
    if !out.status.success() {
        return Err(failed(format!("iptables {}", args.join(" ")), &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the rules for `spec`, replacing any weft rules already there.
///
/// # Errors
/// Not root, `iptables`/`iptables-restore` missing, bad ports, or the
/// kernel refused a rule (the message has iptables' own words).
pub fn install(spec: &Spec) -> Result<(), InterceptError> {
    spec.check()?;
    uninstall()?;
    let text = rules(spec);
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| InterceptError::Missing { tool: "iptables-restore", error })?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(text.as_bytes())
            .map_err(|error| InterceptError::Missing { tool: "iptables-restore", error })?;
    }
    let out = child.wait_with_output().map_err(|error| InterceptError::Missing { tool: "iptables-restore", error })?;
    if !out.status.success() {
        return Err(failed("iptables-restore --noflush".into(), &out));
    }
    Ok(())
}

/// A failed `command`: iptables' "Permission denied (you must be root)"
/// as root means the NET_ADMIN capability is missing; anything else in
/// iptables' own words.
fn failed(command: String, out: &std::process::Output) -> InterceptError {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.contains("Permission denied") {
        return InterceptError::NoNetAdmin { command };
    }
    InterceptError::Failed { command, status: out.status, stderr }
}

fn require_root() -> Result<(), InterceptError> {
    let uid = rustix::process::geteuid().as_raw();
    if uid != 0 {
        return Err(InterceptError::NotRoot(uid));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_lists_refuse_repeats_by_position() {
        assert_eq!(distinct_list_items("a:1, b:2").unwrap(), ["a:1", "b:2"]);
        assert_eq!(
            distinct_list_items("a:1,b:2,a:1"),
            Err(ListError::Duplicate { list: "a:1,b:2,a:1".into(), item: "a:1".into(), position: 3, first: 1 })
        );
        assert!(matches!(distinct_list_items("a:1,,b:2"), Err(ListError::EmptyItem { position: 2, .. })));
    }

    #[test]
    fn lists_refuse_empty_items_and_drop_repeats() {
        for (list, position) in [("22,,23", 2), ("22,", 2), (",22", 1)] {
            assert_eq!(parse_ports(list), Err(ListError::EmptyItem { list: list.into(), position }), "{list}");
        }
        assert_eq!(parse_ports(""), Ok(vec![]));
        assert_eq!(parse_ports("15020, 22,15020"), Ok(vec![15020, 22]));
        assert_eq!(parse_ports("0").unwrap_err().to_string(), "\"0\" is not a port: a port is 1-65535");
        assert!(matches!(parse_ports("70000"), Err(ListError::Port(_))));
        assert_eq!(parse_cidrs("10.0.0.0/8,10.0.0.0/8").unwrap().len(), 1);
    }

    #[test]
    fn a_cidr_with_host_bits_is_refused_naming_its_network() {
        let err = parse_cidrs("10.0.0.1/8").unwrap_err();
        assert_eq!(
            err.to_string(),
            "10.0.0.1/8 has host bits set: the network is 10.0.0.0/8; write that (or a /32 for one address)"
        );
        assert!(parse_cidrs("169.254.169.254/32,0.0.0.0/0,192.0.2.0/24").is_ok());
        assert!(matches!(parse_cidrs("fd00::1/8"), Err(ListError::HostBits { .. })));
    }

    fn spec() -> Spec {
        Spec {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            skip_inbound_ports: vec![15020, 22],
            skip_outbound_ports: vec![5432],
            skip_outbound_cidrs: vec!["169.254.169.254/32".parse().unwrap(), "fd00::/8".parse().unwrap()],
        }
    }

    #[test]
    fn the_rule_set_redirects_everything_but_the_proxy_loopback_and_skips() {
        let text = rules(&spec());
        let expected = "*nat
:WEFT_INBOUND - [0:0]
:WEFT_OUTPUT - [0:0]
:WEFT_REDIRECT - [0:0]
-A PREROUTING -p tcp -j WEFT_INBOUND
-A OUTPUT -p tcp -j WEFT_OUTPUT
-A WEFT_INBOUND -p tcp ! --syn -j RETURN
-A WEFT_INBOUND -p tcp --dport 15006 -j RETURN
-A WEFT_INBOUND -p tcp --dport 15020 -j RETURN
-A WEFT_INBOUND -p tcp --dport 22 -j RETURN
-A WEFT_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A WEFT_OUTPUT -p tcp ! --syn -j RETURN
-A WEFT_OUTPUT -o lo -j RETURN
-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A WEFT_OUTPUT -p tcp --dport 5432 -j RETURN
-A WEFT_OUTPUT -d 169.254.169.254/32 -j RETURN
-A WEFT_OUTPUT -j WEFT_REDIRECT
-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
        assert_eq!(text, expected);
    }

    #[test]
    fn every_rule_is_in_a_weft_chain_or_a_jump_into_one() {
        for line in rules(&spec()).lines().filter(|l| l.starts_with("-A ")) {
            let chain = line.split_whitespace().nth(1).unwrap();
            assert!(CHAINS.contains(&chain) || line.ends_with("-j WEFT_INBOUND") || line.ends_with("-j WEFT_OUTPUT"));
        }
    }

    #[test]
    fn uninstall_removes_the_jumps_before_the_chains() {
        // As `iptables -t nat -S` lists a table with weft's rules, a jump added
        // twice, and someone else's rule.
        let mut listed =
            String::from("-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N WEFT_INBOUND\n-N WEFT_OUTPUT\n-N WEFT_REDIRECT\n");
        listed += "-A PREROUTING -p tcp -j WEFT_INBOUND\n-A OUTPUT -p tcp -m tcp --dport 4444 -j RETURN\n";
        listed += "-A OUTPUT -p tcp -j WEFT_OUTPUT\n-A OUTPUT -p tcp -j WEFT_OUTPUT\n";
        listed += "-A WEFT_OUTPUT -j WEFT_REDIRECT\n-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n";
        let steps: Vec<String> = removal(&listed).steps.iter().map(|s| s.join(" ")).collect();
        assert_eq!(
            steps,
            [
                "-w -t nat -D PREROUTING -p tcp -j WEFT_INBOUND",
                "-w -t nat -D OUTPUT -p tcp -j WEFT_OUTPUT",
                "-w -t nat -D OUTPUT -p tcp -j WEFT_OUTPUT",
                "-w -t nat -F WEFT_INBOUND",
                "-w -t nat -F WEFT_OUTPUT",
                "-w -t nat -F WEFT_REDIRECT",
                "-w -t nat -X WEFT_INBOUND",
                "-w -t nat -X WEFT_OUTPUT",
                "-w -t nat -X WEFT_REDIRECT",
            ]
        );
        let untouched = "-P PREROUTING ACCEPT\n-A OUTPUT -p tcp -m tcp --dport 4444 -j RETURN\n";
        assert!(removal(untouched).is_empty(), "nothing of weft's: nothing to remove");
        // The jumps `rules` adds are the ones found.
        let installed = rules(&spec()).replace(":WEFT", "-N WEFT");
        assert_eq!(removal(&installed).steps.iter().filter(|s| s[3] == "-D").count(), JUMPS.len());
    }

    #[test]
    fn an_ipv6_skip_cidr_is_refused_by_name() {
        let err = spec().check().unwrap_err();
        assert!(matches!(err, InterceptError::Ipv6Cidr(_)), "{err}");
        assert!(err.to_string().contains("fd00::/8") && err.to_string().contains("only IPv4"), "{err}");
        let mut v4 = spec();
        v4.skip_outbound_cidrs.retain(|c| c.addr.is_ipv4());
        assert!(v4.check().is_ok());
    }

    #[test]
    fn cidrs_parse_with_their_limits() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().unwrap_err().to_string().contains("ADDRESS/PREFIX"));
        assert!("x/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn equal_or_zero_ports_are_refused_before_anything_runs() {
        let mut s = spec();
        s.outbound_port = s.inbound_port;
        assert!(matches!(install(&s), Err(InterceptError::Ports { .. })));
    }
}
