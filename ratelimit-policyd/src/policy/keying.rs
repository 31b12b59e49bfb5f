//! Which key a request is counted under, and whether it is exempt.

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{Config, WithoutSasl};
use crate::key;
use crate::protocol::PolicyRequest;

/// The key for a request, normalized; `None` when it is not counted.
///
/// A `sasl_username` that normalizes to nothing (only whitespace) is no user: the
/// request is keyed as one without SASL (`[keying] without_sasl`), never under the
/// one key `""` that every such request would share.
pub fn request_key<'a>(cfg: &Config, req: &PolicyRequest<'a>) -> Option<Cow<'a, str>> {
    if let Some(user) = req.sasl_username.map(key::normalize)
        && !user.is_empty()
    {
        return Some(user);
    }
    match cfg.keying.without_sasl {
        WithoutSasl::Skip => None,
        WithoutSasl::ClientAddress => {
            let ip = parse_ip(req.client_address?)?;
            Some(Cow::Owned(format!("ip:{ip}")))
        }
        WithoutSasl::ClientPrefix => {
            let ip = parse_ip(req.client_address?)?;
            let net = client_network(ip, cfg.keying.ipv4_prefix, cfg.keying.ipv6_prefix);
            Some(Cow::Owned(format!("net:{net}")))
        }
        WithoutSasl::Sender => {
            let sender = req.sender?;
            let key = format!("sender:{}", key::normalize(sender));
            Some(Cow::Owned(key::bound(Cow::Owned(key)).into_owned()))
        }
    }
}

/// The network of `ip` at the configured prefix lengths.
pub fn client_network(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    let prefix = if ip.is_ipv4() { v4 } else { v6 };
    IpNet::new(ip, prefix)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An address attribute's value, when it is one.
pub fn parse_ip(raw: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(raw).ok()?.parse().ok()
}

/// Never limited: an exempt user, a user of an exempt domain, or an exempt client.
pub fn is_exempt(cfg: &Config, key: &str, req: &PolicyRequest<'_>) -> bool {
    is_exempt_user(cfg, key)
        || (!cfg.exempt.clients.is_empty()
            && req
                .client_address
                .and_then(parse_ip)
                .is_some_and(|ip| cfg.exempt.clients.iter().any(|n| n.contains(&ip))))
}

/// An exempt user, or a user of an exempt domain.
pub fn is_exempt_user(cfg: &Config, key: &str) -> bool {
    cfg.exempt.users.contains(key)
        || (!cfg.exempt.domains.is_empty()
            && key
                .rsplit_once('@')
                .is_some_and(|(_, domain)| cfg.exempt.domains.contains(domain)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_networks_use_the_prefix() {
        let ip: IpAddr = "192.0.2.77".parse().unwrap();
        assert_eq!(client_network(ip, 24, 64).to_string(), "192.0.2.0/24");
        let ip6: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(client_network(ip6, 24, 64).to_string(), "2001:db8:1:2::/64");
    }
}
