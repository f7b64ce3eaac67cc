//! The hosts to try for a leg, in order: a route's single host, its weighted primary set then
//! its secondary set, or a domain's MX hosts by preference with the A/AAAA fallback of
//! RFC 5321 section 5.1. DNS answers are cached by their TTL (hickory's cache).

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use mailroute_config::document::{Destination, Host, WeightedHostPort};
use std::net::{IpAddr, SocketAddr};

/// One host to try: where to connect and the name its certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub name: String,
}

/// Why no host could be found.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The domain does not exist, or says it takes no mail (null MX, RFC 7505): permanent.
    #[error("{0}")]
    Permanent(String),
    #[error("{0}")]
    Temporary(String),
}

/// Name resolution for upstreams.
#[derive(Debug)]
pub struct Resolver {
    dns: TokioResolver,
}

impl Resolver {
    /// The system's resolver (`/etc/resolv.conf`), or the given name server (tests, or a
    /// cluster that wants a specific one).
    pub fn new(server: Option<SocketAddr>) -> Result<Self, String> {
        let builder = match server {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(|e| e.to_string())?,
        };
        let dns = builder.build().map_err(|e| e.to_string())?;
        Ok(Self { dns })
    }

    /// Candidates for a route's destination (`Mx` destinations resolved like direct delivery).
    pub async fn route_hosts(
        &self,
        destination: &Destination,
    ) -> Result<Vec<Candidate>, ResolveError> {
        match destination {
            Destination::Host(hp) => self.addresses(&hp.host, hp.port).await,
            Destination::Mx { domain, port, .. } => self.mx(domain.as_str(), *port).await,
            Destination::HostSets { primary, secondary } => {
                let mut out = Vec::new();
                let mut last = None;
                for set in [primary, secondary] {
                    for hp in weighted_order(set) {
                        match self.addresses(&hp.host, hp.port).await {
                            Ok(found) => out.extend(found),
                            Err(e) => last = Some(e),
                        }
                    }
                }
                match (out.is_empty(), last) {
                    (true, Some(e)) => Err(e),
                    _ => Ok(out),
                }
            }
        }
    }

    /// The TXT records at `name`, each one's strings joined (a DKIM key record, for the
    /// operator's check that it is published); none when the name has none or does not exist.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, ResolveError> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.dns.txt_lookup(fqdn.as_str()).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(ResolveError::Temporary(format!(
                "TXT lookup for {name}: {e}"
            ))),
        }
    }

    /// The MX hosts of `domain` by preference, each with its addresses; the domain's own
    /// addresses when it has no MX record.
    pub async fn mx(&self, domain: &str, port: u16) -> Result<Vec<Candidate>, ResolveError> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mut exchanges: Vec<(u16, String)> = match self.dns.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((
                        mx.preference,
                        mx.exchange.to_ascii().trim_end_matches('.').to_owned(),
                    )),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => {
                return Err(ResolveError::Permanent(format!(
                    "domain {domain} does not exist"
                )));
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => {
                return Err(ResolveError::Temporary(format!(
                    "MX lookup for {domain}: {e}"
                )));
            }
        };
        if exchanges.len() == 1 && (exchanges[0].1.is_empty() || exchanges[0].1 == ".") {
            return Err(ResolveError::Permanent(format!(
                "domain {domain} accepts no mail (null MX)"
            )));
        }
        if exchanges.is_empty() {
            exchanges.push((0, domain.to_owned()));
        }
        exchanges.sort_by_key(|(pref, _)| *pref);
        let mut out = Vec::new();
        let mut last = None;
        for (_, host) in exchanges {
            match self.host(&host, port).await {
                Ok(found) => out.extend(found),
                Err(e) => last = Some(e),
            }
        }
        match (out.is_empty(), last) {
            (true, Some(e)) => Err(e),
            (true, None) => Err(ResolveError::Temporary(format!(
                "no address for the mail hosts of {domain}"
            ))),
            _ => Ok(out),
        }
    }

    async fn addresses(&self, host: &Host, port: u16) -> Result<Vec<Candidate>, ResolveError> {
        match host {
            Host::Ip(ip) => Ok(vec![Candidate {
                addr: SocketAddr::new(*ip, port),
                name: ip.to_string(),
            }]),
            Host::Name(name) => self.host(name.as_str(), port).await,
        }
    }

    /// The addresses of one host name (or IP literal), each a candidate on `port`.
    pub async fn host(&self, host: &str, port: u16) -> Result<Vec<Candidate>, ResolveError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![Candidate {
                addr: SocketAddr::new(ip, port),
                name: host.to_owned(),
            }]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.dns.lookup_ip(fqdn.as_str()).await {
            Ok(ips) => Ok(ips
                .iter()
                .map(|ip| Candidate {
                    addr: SocketAddr::new(ip, port),
                    name: host.to_owned(),
                })
                .collect()),
            Err(e) if e.is_nx_domain() => Err(ResolveError::Permanent(format!(
                "host {host} does not exist"
            ))),
            Err(e) => Err(ResolveError::Temporary(format!("address of {host}: {e}"))),
        }
    }
}

/// A weighted random order of a host set: each host comes first with probability proportional
/// to its weight (weights are proportions, not percentages), then the rest likewise.
pub fn weighted_order(set: &[WeightedHostPort]) -> Vec<&WeightedHostPort> {
    let mut pool: Vec<&WeightedHostPort> = set.iter().collect();
    let mut out = Vec::with_capacity(pool.len());
    while !pool.is_empty() {
        let total: u64 = pool.iter().map(|h| u64::from(h.weight.max(1))).sum();
        let mut pick = random_below(total);
        let mut index = 0;
        for (i, h) in pool.iter().enumerate() {
            let w = u64::from(h.weight.max(1));
            if pick < w {
                index = i;
                break;
            }
            pick -= w;
        }
        out.push(pool.remove(index));
    }
    out
}

/// A number below `bound` from a per-thread xorshift generator seeded from the clock: load
/// spreading, not cryptography.
fn random_below(bound: u64) -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9e37_79b9_7f4a_7c15)
                | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x % bound.max(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_proportions() {
        let set: Vec<WeightedHostPort> = [("10.0.0.1", 3), ("10.0.0.2", 1)]
            .iter()
            .map(|(h, w)| WeightedHostPort {
                host: h.parse().unwrap_or_else(|e| panic!("{e:?}")),
                port: 25,
                weight: *w,
            })
            .collect();
        let first_is_heavy = (0..4000)
            .filter(|_| weighted_order(&set)[0].weight == 3)
            .count();
        // Expected 3000 of 4000; a generous band keeps this from flaking.
        assert!((2700..3300).contains(&first_is_heavy), "{first_is_heavy}");
        assert_eq!(weighted_order(&set).len(), 2);
    }
}
