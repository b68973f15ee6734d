//! IP networks written as CIDR (`10.0.0.0/8`, `2001:db8::/32`) or plain addresses.
//!
//! Used for per-connection trusted IPs (SIP.TG's "Trusted IPs": addresses and subnets) and for
//! the brute-force allow-list. Small on purpose: parse, print, match. Addresses are compared in
//! canonical form, so an IPv4 peer seen on a dual-stack socket as `::ffff:192.0.2.1` matches
//! `192.0.2.0/24`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a string is not a CIDR network; names the offending part so config errors are clear.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Nothing to parse (empty or whitespace only).
    #[error("empty network")]
    Empty,
    /// The part before `/` is not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IP address")]
    Address(String),
    /// The part after `/` is not a decimal number.
    #[error("{0:?} is not a prefix length")]
    Prefix(String),
    /// The prefix is longer than the address (more than 32 for IPv4, 128 for IPv6).
    #[error("prefix /{prefix} is longer than /{max}")]
    PrefixTooLong { prefix: u32, max: u8 },
}

/// An IP network: an address with its host bits cleared and a prefix length.
///
/// Host bits written in the input are cleared (`192.168.1.7/24` is `192.168.1.0/24`), as
/// iptables and fail2ban do, since that is what someone writing it means. IPv4-mapped IPv6
/// networks (`::ffff:10.0.0.0/104`) are stored as the IPv4 network they denote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Builds a network from an address and prefix length, clearing host bits.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let max = max_prefix(&addr);
        if prefix > max {
            return Err(CidrError::PrefixTooLong {
                prefix: u32::from(prefix),
                max,
            });
        }
        // An IPv4-mapped IPv6 network covering only mapped addresses is an IPv4 network.
        if let IpAddr::V6(v6) = addr {
            if let Some(v4) = v6.to_ipv4_mapped() {
                if prefix >= 96 {
                    return Ok(Self::masked(IpAddr::V4(v4), prefix - 96));
                }
            }
        }
        Ok(Self::masked(addr, prefix))
    }

    /// The single-address network of `ip` (/32 or /128), in canonical form.
    pub fn host(ip: IpAddr) -> Self {
        let ip = ip.to_canonical();
        let prefix = max_prefix(&ip);
        Self { addr: ip, prefix }
    }

    fn masked(addr: IpAddr, prefix: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask_v4(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask_v6(prefix))),
        };
        Self { addr, prefix }
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside this network. An IPv4 network never contains an IPv6 address
    /// (other than an IPv4-mapped one) and vice versa, so `0.0.0.0/0` is "all of IPv4" only.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask_v4(self.prefix);
                u32::from(ip) & m == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask_v6(self.prefix);
                u128::from(ip) & m == u128::from(net)
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask_v4(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - u32::from(p)),
    }
}

fn mask_v6(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p if p >= 128 => u128::MAX,
        p => u128::MAX << (128 - u32::from(p)),
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `addr/prefix` or a plain address (a host network). IPv6 may be bracketed
    /// (`[2001:db8::1]`, `[2001:db8::]/32`) since people copy addresses out of URIs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(CidrError::Empty);
        }
        let (addr_part, prefix_part) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let bare = addr_part
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr_part);
        let addr = IpAddr::from_str(bare).map_err(|_| CidrError::Address(addr_part.to_string()))?;
        let prefix = match prefix_part {
            None => max_prefix(&addr),
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrError::Prefix(p.to_string()));
                }
                let n: u32 = p.parse().map_err(|_| CidrError::Prefix(p.to_string()))?;
                let max = max_prefix(&addr);
                if n > u32::from(max) {
                    return Err(CidrError::PrefixTooLong { prefix: n, max });
                }
                // n <= 128 here, so it fits.
                u8::try_from(n).map_err(|_| CidrError::Prefix(p.to_string()))?
            }
        };
        Self::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    /// Always `addr/prefix`, so the output parses back to the same network.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn net(s: &str) -> Cidr {
        s.parse().expect("test network")
    }

    #[test]
    fn parses_networks_and_plain_addresses() {
        let n = net("10.0.0.0/8");
        assert_eq!(n.addr(), ip("10.0.0.0"));
        assert_eq!(n.prefix_len(), 8);
        assert_eq!(net("192.0.2.7").prefix_len(), 32);
        assert_eq!(net("2001:db8::1").prefix_len(), 128);
        let v6 = net("2001:db8::/32");
        assert_eq!(v6.addr(), ip("2001:db8::"));
        assert_eq!(v6.to_string(), "2001:db8::/32");
        assert_eq!(net("  10.1.2.3/16 ").to_string(), "10.1.0.0/16");
        assert_eq!(net("[2001:db8::1]").to_string(), "2001:db8::1/128");
        assert_eq!(net("[2001:db8::]/48").to_string(), "2001:db8::/48");
        assert_eq!(net("10.0.0.0/08").prefix_len(), 8); // a leading zero in the prefix is fine
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(net("192.168.1.77/24").to_string(), "192.168.1.0/24");
        assert_eq!(
            net("2001:db8:aaaa:bbbb::1/64").to_string(),
            "2001:db8:aaaa:bbbb::/64"
        );
    }

    #[test]
    fn matching() {
        let n = net("10.0.0.0/8");
        assert!(n.contains(ip("10.0.0.0")));
        assert!(n.contains(ip("10.255.255.255")));
        assert!(!n.contains(ip("11.0.0.0")));
        assert!(!n.contains(ip("9.255.255.255")));
        assert!(!n.contains(ip("::a00:1"))); // IPv4-compatible is not IPv4
        assert!(n.contains(ip("::ffff:10.1.2.3"))); // IPv4-mapped is

        let v6 = net("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
    }

    #[test]
    fn edge_prefixes() {
        let all4 = net("0.0.0.0/0");
        assert!(all4.contains(ip("0.0.0.0")));
        assert!(all4.contains(ip("255.255.255.255")));
        assert!(!all4.contains(ip("::1")));
        let all6 = net("::/0");
        assert!(all6.contains(ip("::")));
        assert!(all6.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!all6.contains(ip("1.2.3.4")));
        // A host part with /0 is cleared entirely.
        assert_eq!(net("1.2.3.4/0").to_string(), "0.0.0.0/0");

        let h4 = net("192.0.2.1/32");
        assert!(h4.contains(ip("192.0.2.1")));
        assert!(!h4.contains(ip("192.0.2.0")));
        assert!(!h4.contains(ip("192.0.2.2")));
        let h6 = net("2001:db8::1/128");
        assert!(h6.contains(ip("2001:db8::1")));
        assert!(!h6.contains(ip("2001:db8::")));
        assert!(!h6.contains(ip("2001:db8::2")));
        assert!(net("255.255.255.255/32").contains(ip("255.255.255.255")));
        let top = net("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128");
        assert!(top.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        let b31 = net("192.0.2.0/31");
        assert!(b31.contains(ip("192.0.2.1")));
        assert!(!b31.contains(ip("192.0.2.2")));
        let b127 = net("2001:db8::/127");
        assert!(b127.contains(ip("2001:db8::1")));
        assert!(!b127.contains(ip("2001:db8::2")));
    }

    #[test]
    fn mapped_networks_become_ipv4() {
        let n = net("::ffff:10.0.0.0/104");
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(n.contains(ip("10.9.9.9")));
        assert_eq!(
            Cidr::host(ip("::ffff:192.0.2.1")).to_string(),
            "192.0.2.1/32"
        );
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert_eq!("".parse::<Cidr>(), Err(CidrError::Empty));
        assert_eq!("   ".parse::<Cidr>(), Err(CidrError::Empty));
        assert!(matches!(
            "10.0.0/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!(
            "host/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!("/8".parse::<Cidr>(), Err(CidrError::Address(_))));
        // Leading zeros in IPv4 octets could mean octal to some tools: refused.
        assert!(matches!(
            "010.0.0.0/8".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!(
            "fe80::1%eth0".parse::<Cidr>(),
            Err(CidrError::Address(_))
        ));
        assert!(matches!(
            "10.0.0.0/".parse::<Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "10.0.0.0/+8".parse::<Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "10.0.0.0/-1".parse::<Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "10.0.0.0/8/8".parse::<Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "10.0.0.0/ 8".parse::<Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "10.0.0.0/99999999999999999999".parse::<Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong {
                prefix: 33,
                max: 32
            })
        );
        assert_eq!(
            "::/129".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong {
                prefix: 129,
                max: 128
            })
        );
        assert_eq!(
            Cidr::new(ip("10.0.0.0"), 40),
            Err(CidrError::PrefixTooLong {
                prefix: 40,
                max: 32
            })
        );
    }

    #[test]
    fn display_round_trips_and_serde() {
        for s in [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "192.0.2.1/32",
            "::/0",
            "2001:db8::/32",
        ] {
            assert_eq!(net(s).to_string(), s);
            assert_eq!(net(&net(s).to_string()), net(s));
        }
        let v: Vec<Cidr> = serde_json::from_str(r#"["10.0.0.0/8","2001:db8::1"]"#).expect("json");
        assert_eq!(v, vec![net("10.0.0.0/8"), net("2001:db8::1/128")]);
        assert_eq!(
            serde_json::to_string(&v).expect("json"),
            r#"["10.0.0.0/8","2001:db8::1/128"]"#
        );
        assert!(serde_json::from_str::<Cidr>(r#""10.0.0.0/33""#).is_err());
    }
}
