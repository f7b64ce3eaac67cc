//! Client address ranges, checked and normalised.

use ipnet::{IpNet, Ipv4Net};
use std::net::IpAddr;

/// The most addresses one range may cover: an IPv4 /16 or an IPv6 /112.
pub const MAX_RANGE_ADDRESSES: u64 = 65_536;

/// Why a range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("{0:?} is not an IPv4 or IPv6 address or CIDR range")]
    Syntax(String),
    #[error(
        "{given} has host bits set: write {network} for the whole network, or {host} for the one address"
    )]
    HostBits {
        given: String,
        network: IpNet,
        host: IpNet,
    },
    #[error(
        "{0} covers more than 65,536 addresses; split it into ranges of at most IPv4 /16 or IPv6 /112"
    )]
    TooLarge(IpNet),
}

/// Parses a range in any textual form (`10.1.0.0/16`, `2001:DB8:0:0::/112`, a single address,
/// an IPv4-mapped IPv6 range) into canonical form: host bits must be zero, IPv4-mapped IPv6
/// ranges become IPv4 ranges (clients are matched on their IPv4 address either way), and IPv6 is
/// written in lower-case compressed form.
pub fn parse_range(text: &str) -> Result<IpNet, RangeError> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => return Err(RangeError::Syntax(text.to_owned())),
        },
    };
    let net = unmap(net);
    if net.trunc() != net {
        return Err(RangeError::HostBits {
            given: text.to_owned(),
            network: net.trunc(),
            host: IpNet::from(net.addr()),
        });
    }
    if range_size(&net) > MAX_RANGE_ADDRESSES {
        return Err(RangeError::TooLarge(net));
    }
    Ok(net)
}

/// The number of addresses a range covers (saturating at `u64::MAX`).
pub fn range_size(net: &IpNet) -> u64 {
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    1u64.checked_shl(host_bits).unwrap_or(u64::MAX)
}

/// An IPv4-mapped IPv6 range (`::ffff:a.b.c.d/96+n`) as the IPv4 range it denotes.
fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

/// A client address in the form ranges are matched against: IPv4-mapped IPv6 as IPv4.
pub fn canonical_client(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> String {
        parse_range(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .to_string()
    }

    #[test]
    fn ranges_of_at_most_65536_addresses_are_accepted() {
        assert_eq!(ok("10.1.0.0/16"), "10.1.0.0/16");
        assert_eq!(ok("192.0.2.7"), "192.0.2.7/32");
        assert_eq!(ok("2001:db8::/112"), "2001:db8::/112");
        assert!(matches!(
            parse_range("10.0.0.0/15"),
            Err(RangeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_range("2001:db8::/111"),
            Err(RangeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_range("0.0.0.0/0"),
            Err(RangeError::TooLarge(_))
        ));
    }

    #[test]
    fn host_bits_are_refused_with_both_fixes_named() {
        let err = parse_range("10.0.0.1/24").err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "10.0.0.1/24 has host bits set: write 10.0.0.0/24 for the whole network, or 10.0.0.1/32 for the one address"
            )
        );
    }

    #[test]
    fn ipv6_in_any_textual_form_is_normalised() {
        for form in [
            "2001:DB8::/112",
            "2001:0db8:0000:0000:0000:0000:0000:0000/112",
            "2001:db8:0:0::/112",
            " 2001:db8::0/112 ",
        ] {
            assert_eq!(ok(form), "2001:db8::/112", "{form}");
        }
        assert_eq!(ok("::ffff:192.0.2.0/120"), "192.0.2.0/24");
        assert_eq!(ok("::FFFF:C000:0200/120"), "192.0.2.0/24");
        assert_eq!(ok("::1"), "::1/128");
    }

    #[test]
    fn garbage_is_a_syntax_error() {
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/33",
            "fe80::/129",
            "example.com",
            "10.0.0.0/-1",
        ] {
            assert!(
                matches!(parse_range(bad), Err(RangeError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn mapped_clients_match_ipv4_ranges() {
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap_or_else(|e| panic!("{e}"));
        let net = parse_range("192.0.2.0/24").unwrap_or_else(|e| panic!("{e}"));
        assert!(net.contains(&canonical_client(mapped)));
    }
}
