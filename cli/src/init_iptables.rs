//! `weft init-iptables`: the pod's interception rules (weft-intercept),
//! installed or removed in the current network namespace.

use anyhow::Context;
use clap::Args;
use weft_intercept::{Cidr, Spec};

use crate::output::outln;

/// Flags of `weft init-iptables`; `weft inject` writes them (k8s/src/inject.rs).
#[derive(Args, Debug)]
pub struct InitIptablesArgs {
    /// The UID the sidecar runs as (1-4294967294): its own connections are
    /// never redirected. 0 (root) is refused unless --allow-root-proxy-uid.
    #[arg(long, default_value_t = 1337, value_parser = parse_uid)]
    proxy_uid: u32,
    /// Accept --proxy-uid 0: every process running as root then bypasses
    /// interception (no mTLS, no registryOnly for it).
    #[arg(long)]
    allow_root_proxy_uid: bool,
    /// The sidecar's inbound (mTLS) port; arriving TCP is redirected to it.
    #[arg(long, default_value_t = 15006, value_parser = parse_port)]
    inbound_port: u16,
    /// The sidecar's outbound port; the pod's outgoing TCP is redirected to it.
    #[arg(long, default_value_t = 15001, value_parser = parse_port)]
    outbound_port: u16,
    /// Arriving ports that reach the app directly (comma-separated, may be empty), e.g. 15020,22.
    #[arg(long, default_value = "", value_parser = parse_ports)]
    skip_inbound_ports: PortList,
    /// Destination ports that leave directly (comma-separated), e.g. 5432.
    #[arg(long, default_value = "", value_parser = parse_ports)]
    skip_outbound_ports: PortList,
    /// Destination networks that leave directly (comma-separated CIDRs), e.g. 169.254.169.254/32.
    #[arg(long, default_value = "", value_parser = parse_cidrs)]
    skip_outbound_cidrs: CidrList,
    /// Remove weft's chains and jumps (only those) instead of installing
    /// them. Connections already redirected through the sidecar break.
    #[arg(long, conflicts_with_all = [
        "proxy_uid", "allow_root_proxy_uid", "inbound_port", "outbound_port",
        "skip_inbound_ports", "skip_outbound_ports", "skip_outbound_cidrs",
    ])]
    uninstall: bool,
    /// Print the rules (iptables-restore input) and change nothing; with
    /// --uninstall, print the iptables commands that would remove weft's rules.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Clone)]
struct PortList(Vec<u16>);
#[derive(Debug, Clone)]
struct CidrList(Vec<Cidr>);

/// A UID the owner match can name: 0..=4294967294 (4294967295 is `-1`, "no
/// UID", which the kernel never gives a socket).
fn parse_uid(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(u32::MAX) | Err(_) => Err(format!("{s:?} is not a UID: expected a number from 0 to 4294967294, e.g. 1337")),
        Ok(n) => Ok(n),
    }
}

/// A number that fits a port; 0 is refused by `Spec::check` (with the
/// other port mistakes), so a dry run and an install say the same.
fn parse_port(s: &str) -> Result<u16, String> {
    s.trim().parse::<u16>().map_err(|_| format!("{s:?} is not a port: a port is 1-65535"))
}

// The lists are parsed as `weft inject` parses the annotations it turns into them.
fn parse_ports(s: &str) -> Result<PortList, weft_intercept::ListError> {
    weft_intercept::parse_ports(s).map(PortList)
}

fn parse_cidrs(s: &str) -> Result<CidrList, weft_intercept::ListError> {
    weft_intercept::parse_cidrs(s).map(CidrList)
}

pub fn run(args: InitIptablesArgs) -> anyhow::Result<()> {
    if args.uninstall {
        let removal = if args.dry_run {
            weft_intercept::planned_removal().context("listing weft's iptables rules")?
        } else {
            weft_intercept::uninstall().context("removing weft's iptables rules")?
        };
        if removal.is_empty() {
            outln!("nothing to remove: no weft nat rules in this network namespace")?;
        } else if args.dry_run {
            outln!("would run:\n{}", removal.commands().join("\n"))?;
        } else {
            outln!("removed weft's nat rules:\n{}", removal.commands().join("\n"))?;
        }
        return Ok(());
    }
    if args.proxy_uid == 0 && !args.allow_root_proxy_uid {
        anyhow::bail!(
            "--proxy-uid 0: every process running as root would bypass interception (no mTLS, no registryOnly); run the sidecar as its own UID (default 1337), or pass --allow-root-proxy-uid if that is really meant"
        );
    }
    let spec = Spec {
        proxy_uid: args.proxy_uid,
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        skip_inbound_ports: args.skip_inbound_ports.0,
        skip_outbound_ports: args.skip_outbound_ports.0,
        skip_outbound_cidrs: args.skip_outbound_cidrs.0,
    };
    if args.dry_run {
        // The checks `install` makes, so a dry run refuses what a real one would.
        spec.check()?;
        outln!("{}", weft_intercept::rules(&spec).trim_end())?;
        return Ok(());
    }
    weft_intercept::install(&spec).context("installing weft's iptables rules")?;
    outln!(
        "installed: inbound TCP → :{}, outbound TCP → :{} (uid {} exempt; IPv4 only, IPv6 is not intercepted)",
        spec.inbound_port,
        spec.outbound_port,
        spec.proxy_uid
    )?;
    Ok(())
}
