//! Sessions per client address (`--max-sessions-per-ip`): one client cannot take every
//! session slot of the relay. IPv4 clients count per address, IPv6 clients per /64 (one
//! subscriber's allocation), IPv4-mapped IPv6 addresses as IPv4.

use mailroute_config::net::canonical_client;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// What one client address is counted as.
fn key(ip: IpAddr) -> IpAddr {
    match canonical_client(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Open sessions per client.
#[derive(Debug, Default, Clone)]
pub struct Clients {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A session's place; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    clients: Clients,
    key: IpAddr,
}

impl Clients {
    /// A slot for a session from `ip`, unless it already holds `max`.
    pub fn admit(&self, ip: IpAddr, max: usize) -> Option<Slot> {
        let key = key(ip);
        let mut open = self.open.lock().ok()?;
        let n = open.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            clients: self.clone(),
            key,
        })
    }

    /// Sessions open from `ip`'s address (or /64).
    pub fn count(&self, ip: IpAddr) -> usize {
        self.open
            .lock()
            .ok()
            .and_then(|open| open.get(&key(ip)).copied())
            .unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.clients.open.lock()
            && let Some(n) = open.get_mut(&self.key)
        {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_client_gets_its_share_and_gets_it_back() {
        let clients = Clients::default();
        let a: Vec<Slot> = (0..3)
            .filter_map(|_| clients.admit(ip("192.0.2.1"), 3))
            .collect();
        assert_eq!(a.len(), 3);
        assert!(clients.admit(ip("192.0.2.1"), 3).is_none());
        assert!(
            clients.admit(ip("::ffff:192.0.2.1"), 3).is_none(),
            "mapped is the same"
        );
        assert!(
            clients.admit(ip("192.0.2.2"), 3).is_some(),
            "another client"
        );
        drop(a);
        assert_eq!(clients.count(ip("192.0.2.1")), 0);
        let v6: Vec<Slot> = ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9"]
            .iter()
            .filter_map(|a| clients.admit(ip(a), 2))
            .collect();
        assert_eq!(v6.len(), 2);
        assert!(
            clients.admit(ip("2001:db8:1:2::77"), 2).is_none(),
            "one /64"
        );
        assert!(
            clients.admit(ip("2001:db8:1:3::1"), 2).is_some(),
            "the next /64"
        );
    }
}
