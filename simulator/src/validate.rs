//! Field checks shared by the endpoints: hostnames, SSH public keys, firewall rules.

use std::net::IpAddr;

use md5::{Digest, Md5};
use serde_json::Value;

use crate::request::Body;
use crate::wire::RuleOut;

/// Hetzner limits `user_data` to 32 KiB; taken as bytes of the string (API-NOTES §4, UNVERIFIED).
pub(crate) const MAX_USER_DATA_BYTES: usize = 32 * 1024;
const MAX_RULES: usize = 50;
const MAX_IPS_PER_RULE: usize = 100;
const MAX_RULE_DESCRIPTION: usize = 255;
pub(crate) const MAX_FIREWALL_NAME: usize = 128;

/// RFC 1123 hostname: dot-separated labels of letters, digits and `-`, no label starting or
/// ending with `-`, each ≤ 63, total ≤ 253.
pub(crate) fn hostname_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".to_string());
    }
    if name.len() > 253 {
        return Some("must be at most 253 characters (RFC 1123)".to_string());
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return Some(format!(
                "'{name}' is not a valid hostname (RFC 1123): use letters, digits and '-', \
                 dot-separated labels of 1-63 characters not starting or ending with '-'"
            ));
        }
    }
    None
}

/// A parsed OpenSSH public key: the legacy MD5 fingerprint Hetzner shows, or why it is rejected.
pub(crate) fn ssh_fingerprint(public_key: &str) -> Result<String, String> {
    let key = ssh_key::PublicKey::from_openssh(public_key.trim())
        .map_err(|e| format!("not a valid OpenSSH public key: {e}"))?;
    match key.algorithm() {
        ssh_key::Algorithm::Rsa { .. }
        | ssh_key::Algorithm::Ed25519
        | ssh_key::Algorithm::Ecdsa { .. } => {}
        other => {
            return Err(format!(
                "unsupported key type '{}': use ssh-rsa, ssh-ed25519 or ecdsa-sha2-*",
                other.as_str()
            ));
        }
    }
    let blob = key
        .to_bytes()
        .map_err(|e| format!("cannot encode public key: {e}"))?;
    let digest = Md5::digest(&blob);
    Ok(digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Parses a CIDR; IPv6 comes back in RFC 5952 canonical form, as the API returns it.
pub(crate) fn canonical_cidr(raw: &str) -> Result<String, String> {
    let (addr, len) = raw
        .split_once('/')
        .ok_or_else(|| format!("'{raw}' is not in CIDR notation (address/prefix)"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("'{raw}': '{addr}' is not an IP address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("'{raw}': prefix length '{len}' is not a number"))?;
    let (max, host_bits_zero) = match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = if len >= 32 {
                0
            } else {
                u32::MAX.checked_shr(u32::from(len)).unwrap_or(0)
            };
            (32, len > 32 || bits & mask == 0)
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if len >= 128 {
                0
            } else {
                u128::MAX.checked_shr(u32::from(len)).unwrap_or(0)
            };
            (128, len > 128 || bits & mask == 0)
        }
    };
    if len > max {
        return Err(format!("'{raw}': prefix length must be at most {max}"));
    }
    if !host_bits_zero {
        return Err(format!(
            "'{raw}': host bits must be zero (a network like 10.0.1.0/24, or a single host /{max})"
        ));
    }
    Ok(format!("{addr}/{len}"))
}

fn port_problem(port: &str) -> Option<String> {
    if port == "any" {
        return None;
    }
    let parse = |p: &str| p.parse::<u16>().ok().filter(|n| *n >= 1);
    let ok = match port.split_once('-') {
        None => parse(port).is_some(),
        Some((lo, hi)) => matches!((parse(lo), parse(hi)), (Some(lo), Some(hi)) if lo < hi),
    };
    (!ok).then(|| {
        format!("'{port}' is not a port: use a number 1-65535, a range like '1024-5000', or 'any'")
    })
}

fn cidr_list(rule: &mut Body, field: &str, path: &str) -> Vec<String> {
    let Some(items) = rule.array(field) else {
        return Vec::new();
    };
    if items.len() > MAX_IPS_PER_RULE {
        rule.error(
            format!("{path}.{field}"),
            format!("at most {MAX_IPS_PER_RULE} entries"),
        );
    }
    let mut out = Vec::new();
    for item in items {
        match item {
            Value::String(s) => match canonical_cidr(&s) {
                Ok(c) => out.push(c),
                Err(e) => rule.error(format!("{path}.{field}"), e),
            },
            _ => rule.error(format!("{path}.{field}"), "entries must be strings"),
        }
    }
    out
}

/// Validates a `rules` array (request shape) into response-shaped rules. Problems go into `body`
/// under names like `rules[2].port`.
pub(crate) fn firewall_rules(body: &mut Body, items: Vec<Value>) -> Vec<RuleOut> {
    if items.len() > MAX_RULES {
        body.error("rules", format!("at most {MAX_RULES} rules per firewall"));
    }
    let mut rules = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("rules[{i}]");
        let Value::Object(map) = item else {
            body.error(path, "must be an object");
            continue;
        };
        let mut rule = Body::from_map(map);
        let direction = match rule.required_string("direction").as_deref() {
            Some("in") => Some("in"),
            Some("out") => Some("out"),
            Some(other) => {
                rule.error("direction", format!("'{other}' is not one of in, out"));
                None
            }
            None => None,
        };
        let protocol = match rule.required_string("protocol").as_deref() {
            Some("tcp") => Some("tcp"),
            Some("udp") => Some("udp"),
            Some("icmp") => Some("icmp"),
            Some("esp") => Some("esp"),
            Some("gre") => Some("gre"),
            Some(other) => {
                rule.error(
                    "protocol",
                    format!("'{other}' is not one of tcp, udp, icmp, esp, gre"),
                );
                None
            }
            None => None,
        };
        let port = rule.string("port");
        match (protocol, &port) {
            (Some("tcp" | "udp"), None) => rule.error("port", "is required for tcp and udp"),
            (Some("tcp" | "udp"), Some(p)) => {
                if let Some(problem) = port_problem(p) {
                    rule.error("port", problem);
                }
            }
            (Some(_), Some(_)) => rule.error("port", "only allowed for tcp and udp"),
            _ => {}
        }
        let has_source = rule.has("source_ips");
        let has_destination = rule.has("destination_ips");
        let source_ips = cidr_list(&mut rule, "source_ips", &path);
        let destination_ips = cidr_list(&mut rule, "destination_ips", &path);
        match direction {
            Some("in") => {
                if has_destination && !destination_ips.is_empty() {
                    rule.error("destination_ips", "only allowed for direction out");
                }
                if source_ips.is_empty() && !has_source_errors(&rule, &path) {
                    rule.error(
                        "source_ips",
                        "at least one CIDR is required for direction in",
                    );
                }
            }
            Some("out") => {
                if has_source && !source_ips.is_empty() {
                    rule.error("source_ips", "only allowed for direction in");
                }
                if destination_ips.is_empty() && !has_destination_errors(&rule, &path) {
                    rule.error(
                        "destination_ips",
                        "at least one CIDR is required for direction out",
                    );
                }
            }
            _ => {}
        }
        let description = rule.string("description");
        if let Some(d) = &description
            && d.chars().count() > MAX_RULE_DESCRIPTION
        {
            rule.error(
                "description",
                format!("at most {MAX_RULE_DESCRIPTION} characters"),
            );
        }
        rule.reject_unknown();
        let ok = rule.errors.is_empty();
        for mut e in std::mem::take(&mut rule.errors) {
            if !e.name.starts_with(&path) {
                e.name = format!("{path}.{}", e.name);
            }
            body.errors.push(e);
        }
        if let (true, Some(direction), Some(protocol)) = (ok, direction, protocol) {
            rules.push(RuleOut {
                description,
                direction,
                source_ips,
                destination_ips,
                protocol,
                port,
            });
        }
    }
    rules
}

fn has_source_errors(rule: &Body, path: &str) -> bool {
    let name = format!("{path}.source_ips");
    rule.errors.iter().any(|e| e.name == name)
}

fn has_destination_errors(rule: &Body, path: &str) -> bool {
    let name = format!("{path}.destination_ips");
    rule.errors.iter().any(|e| e.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        for good in ["web-1", "a", "vps-42.example", &"a".repeat(63)] {
            assert!(hostname_problem(good).is_none(), "{good}");
        }
        for bad in [
            "",
            "-web",
            "web-",
            "web_1",
            "a..b",
            "wé",
            &"a".repeat(64),
            "a b",
        ] {
            assert!(hostname_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(canonical_cidr("10.0.1.0/24").unwrap(), "10.0.1.0/24");
        assert_eq!(canonical_cidr("0.0.0.0/0").unwrap(), "0.0.0.0/0");
        assert_eq!(
            canonical_cidr("2001:0DB8:0000:0000::/64").unwrap(),
            "2001:db8::/64"
        );
        assert_eq!(canonical_cidr("::/0").unwrap(), "::/0");
        assert_eq!(canonical_cidr("10.0.1.1/32").unwrap(), "10.0.1.1/32");
        for bad in [
            "10.0.1.1",
            "10.0.1.1/24",
            "10.0.0.0/33",
            "x/8",
            "::1/129",
            "10.0.0.0/x",
        ] {
            assert!(canonical_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports() {
        for good in ["80", "1024-5000", "any", "65535"] {
            assert!(port_problem(good).is_none(), "{good}");
        }
        for bad in ["0", "65536", "5000-1024", "80-80", "http", "", "1-"] {
            assert!(port_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn fingerprints_match_ssh_keygen() {
        // Expected values from `ssh-keygen -l -E md5 -f KEY.pub`.
        let cases = [
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsyJHJZuwxE5CyAFsfsb5HO4u4wpEmHPM49mpQItQEd test@sim",
                "d3:07:30:31:26:1f:53:0d:a2:71:26:5b:41:43:ef:76",
            ),
            (
                "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCaq3qAaYL4HqDhSlqKrbO8xcBaynLveRa2BAPPkMtiDsqIwen6eUEsKbA5ZsHxkivSUjtplhXtxGdmBcj50Xxo= e@sim",
                "e8:f9:24:26:e8:fd:3e:ec:a8:35:94:42:6c:85:0c:bf",
            ),
            (
                "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCKXzIOiWIYdfDCR5/nhaywnD0bmLSf0S98tuIIugcV5GquzuoJ1FG2GMvy7lKHEfgklfJNmGAPt2pzVxMmY/R7+l0MgEHeSmip61snlqJVlwfgg4SHZrGAplv/gaOOHPoKRO0lsBbnwmCTe36K2R6B9kQSJB0UyOznyMZFnyI4zQU1bZGP71z7oRKpTIMxblN53PdFDZfyS2Xv3vKyK9hng5uFBCd6A3DHkBBoUE1nMnc50ZUf0ifQ/o1oEjNLVzGNXYznTu0E4a5j70k+m2YKctqP517regpc+pZW5ZDnnWeuKrE89AAEVttJg8lXyih5JICdBCvlMUqMz1kN9+Xr r@sim",
                "bf:c6:ac:74:9b:9f:b7:29:f7:90:9c:3e:3f:01:f9:ad",
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(ssh_fingerprint(key).unwrap(), expected);
        }
        assert!(ssh_fingerprint("ssh-ed25519 AAAAnotbase64!!").is_err());
        assert!(ssh_fingerprint("hello").is_err());
    }
}
