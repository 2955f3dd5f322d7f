//! The forms a listing page is decoded into on its way to the snapshot: the wire types of
//! [`crate::hcloud`], field for field, but borrowing every string from the page's bytes.
//!
//! At 10,000 subscriptions a resync decodes 30,000 resources. Through the wire types each
//! name, label, rule and reference would be copied into a `String` of its own, only to be
//! looked up in the snapshot's interner and dropped; here the interner copies a string the
//! first time it sees it and never again. Fields are decoded with the same rules as the wire
//! types (the same enums, `positive_id`, defaults and optionality), so a page these forms
//! accept reads exactly as the wire types read it; one they refuse is read through the wire
//! types, which name what is wrong ([`super::store_page`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, de};

use crate::hcloud::types::positive_id;
use crate::hcloud::{
    Firewall, FirewallDirection, FirewallProtocol, FirewallResource, FirewallRule, ImageRef,
    Labels, LocationRef, Server, ServerFirewall, ServerIpv4, ServerIpv6, ServerProtection,
    ServerPublicNet, ServerStatus, ServerTypeRef, SshKey,
};

/// A JSON string, borrowed from the page unless it holds escapes (then unescaped into a
/// copy of its own).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text<'a>(Cow<'a, str>);

impl<'a> Text<'a> {
    pub fn of(text: &'a str) -> Self {
        Text(Cow::Borrowed(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Borrowing;
        impl<'de> Visitor<'de> for Borrowing {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(text))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(text.to_owned()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(text))
            }
        }
        deserializer.deserialize_str(Borrowing).map(Text)
    }
}

fn text(text: &str) -> Text<'_> {
    Text::of(text)
}

fn optional(text: &Option<String>) -> Option<Text<'_>> {
    text.as_deref().map(Text::of)
}

/// Labels, sorted by key like [`Labels`] (a key given twice keeps its last value, as there).
pub type LabelsView<'a> = BTreeMap<Text<'a>, Text<'a>>;

fn labels(labels: &Labels) -> LabelsView<'_> {
    labels.iter().map(|(k, v)| (text(k), text(v))).collect()
}

/// [`Server`].
#[derive(Deserialize)]
pub struct ServerView<'a> {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(borrow)]
    pub name: Text<'a>,
    pub status: ServerStatus,
    pub created: DateTime<Utc>,
    #[serde(borrow, default)]
    pub labels: LabelsView<'a>,
    pub locked: bool,
    pub protection: ServerProtection,
    #[serde(borrow)]
    pub public_net: PublicNetView<'a>,
    #[serde(borrow)]
    pub server_type: ServerTypeView<'a>,
    #[serde(borrow)]
    pub location: LocationView<'a>,
    #[serde(borrow)]
    pub image: Option<ImageView<'a>>,
}

impl<'a> ServerView<'a> {
    pub fn of(server: &'a Server) -> Self {
        // Every field named: a field added to the wire type must be added here.
        let Server {
            id,
            name,
            status,
            created,
            labels: server_labels,
            locked,
            protection,
            public_net,
            server_type,
            location,
            image,
        } = server;
        let ServerPublicNet {
            ipv4,
            ipv6,
            firewalls,
        } = public_net;
        ServerView {
            id: *id,
            name: text(name),
            status: *status,
            created: *created,
            labels: labels(server_labels),
            locked: *locked,
            protection: *protection,
            public_net: PublicNetView {
                ipv4: ipv4.as_ref().map(|v4| Ipv4View {
                    ip: text(&v4.ip),
                    blocked: v4.blocked,
                    dns_ptr: text(&v4.dns_ptr),
                }),
                ipv6: ipv6.as_ref().map(|v6| Ipv6View {
                    ip: text(&v6.ip),
                    blocked: v6.blocked,
                }),
                firewalls: firewalls.clone(),
            },
            server_type: ServerTypeView {
                id: server_type.id,
                name: text(&server_type.name),
            },
            location: LocationView {
                id: location.id,
                name: text(&location.name),
                network_zone: optional(&location.network_zone),
            },
            image: image.as_ref().map(|image| ImageView {
                id: image.id,
                name: optional(&image.name),
                os_flavor: optional(&image.os_flavor),
            }),
        }
    }
}

/// [`ServerPublicNet`].
#[derive(Deserialize)]
pub struct PublicNetView<'a> {
    #[serde(borrow)]
    pub ipv4: Option<Ipv4View<'a>>,
    #[serde(borrow)]
    pub ipv6: Option<Ipv6View<'a>>,
    #[serde(default)]
    pub firewalls: Vec<ServerFirewall>,
}

impl PublicNetView<'_> {
    /// Addresses are the server's own: nothing to share, so they are copied.
    pub fn owned(&self) -> ServerPublicNet {
        ServerPublicNet {
            ipv4: self.ipv4.as_ref().map(|v4| ServerIpv4 {
                ip: v4.ip.as_str().to_owned(),
                blocked: v4.blocked,
                dns_ptr: v4.dns_ptr.as_str().to_owned(),
            }),
            ipv6: self.ipv6.as_ref().map(|v6| ServerIpv6 {
                ip: v6.ip.as_str().to_owned(),
                blocked: v6.blocked,
            }),
            firewalls: self.firewalls.clone(),
        }
    }
}

/// [`ServerIpv4`].
#[derive(Deserialize)]
pub struct Ipv4View<'a> {
    #[serde(borrow)]
    pub ip: Text<'a>,
    pub blocked: bool,
    #[serde(borrow)]
    pub dns_ptr: Text<'a>,
}

/// [`ServerIpv6`].
#[derive(Deserialize)]
pub struct Ipv6View<'a> {
    #[serde(borrow)]
    pub ip: Text<'a>,
    pub blocked: bool,
}

/// [`ServerTypeRef`].
#[derive(Deserialize, Hash)]
pub struct ServerTypeView<'a> {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(borrow)]
    pub name: Text<'a>,
}

impl ServerTypeView<'_> {
    pub fn is(&self, stored: &ServerTypeRef) -> bool {
        self.id == stored.id && self.name.as_str() == stored.name
    }

    pub fn owned(&self) -> ServerTypeRef {
        ServerTypeRef {
            id: self.id,
            name: self.name.as_str().to_owned(),
        }
    }
}

/// [`LocationRef`].
#[derive(Deserialize, Hash)]
pub struct LocationView<'a> {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(borrow)]
    pub name: Text<'a>,
    #[serde(borrow, default)]
    pub network_zone: Option<Text<'a>>,
}

impl LocationView<'_> {
    pub fn is(&self, stored: &LocationRef) -> bool {
        self.id == stored.id
            && self.name.as_str() == stored.name
            && self.network_zone.as_ref().map(Text::as_str) == stored.network_zone.as_deref()
    }

    pub fn owned(&self) -> LocationRef {
        LocationRef {
            id: self.id,
            name: self.name.as_str().to_owned(),
            network_zone: self.network_zone.as_ref().map(|z| z.as_str().to_owned()),
        }
    }
}

/// [`ImageRef`].
#[derive(Deserialize, Hash)]
pub struct ImageView<'a> {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(borrow, default)]
    pub name: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub os_flavor: Option<Text<'a>>,
}

impl ImageView<'_> {
    pub fn is(&self, stored: &ImageRef) -> bool {
        self.id == stored.id
            && self.name.as_ref().map(Text::as_str) == stored.name.as_deref()
            && self.os_flavor.as_ref().map(Text::as_str) == stored.os_flavor.as_deref()
    }

    pub fn owned(&self) -> ImageRef {
        ImageRef {
            id: self.id,
            name: self.name.as_ref().map(|n| n.as_str().to_owned()),
            os_flavor: self.os_flavor.as_ref().map(|f| f.as_str().to_owned()),
        }
    }
}

/// [`SshKey`].
#[derive(Deserialize)]
pub struct SshKeyView<'a> {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(borrow)]
    pub name: Text<'a>,
    #[serde(borrow)]
    pub fingerprint: Text<'a>,
    #[serde(borrow)]
    pub public_key: Text<'a>,
    #[serde(borrow, default)]
    pub labels: LabelsView<'a>,
    pub created: DateTime<Utc>,
}

impl<'a> SshKeyView<'a> {
    pub fn of(key: &'a SshKey) -> Self {
        let SshKey {
            id,
            name,
            fingerprint,
            public_key,
            labels: key_labels,
            created,
        } = key;
        SshKeyView {
            id: *id,
            name: text(name),
            fingerprint: text(fingerprint),
            public_key: text(public_key),
            labels: labels(key_labels),
            created: *created,
        }
    }
}

/// [`Firewall`].
#[derive(Deserialize)]
pub struct FirewallView<'a> {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(borrow)]
    pub name: Text<'a>,
    #[serde(borrow, default)]
    pub labels: LabelsView<'a>,
    pub created: DateTime<Utc>,
    #[serde(borrow)]
    pub rules: Vec<RuleView<'a>>,
    #[serde(default)]
    pub applied_to: Vec<FirewallResource>,
}

impl<'a> FirewallView<'a> {
    pub fn of(firewall: &'a Firewall) -> Self {
        let Firewall {
            id,
            name,
            labels: firewall_labels,
            created,
            rules,
            applied_to,
        } = firewall;
        FirewallView {
            id: *id,
            name: text(name),
            labels: labels(firewall_labels),
            created: *created,
            rules: rules.iter().map(RuleView::of).collect(),
            applied_to: applied_to.clone(),
        }
    }
}

/// [`FirewallRule`].
#[derive(Deserialize, Hash)]
pub struct RuleView<'a> {
    pub direction: FirewallDirection,
    pub protocol: FirewallProtocol,
    #[serde(borrow, default)]
    pub port: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub source_ips: Vec<Text<'a>>,
    #[serde(borrow, default)]
    pub destination_ips: Vec<Text<'a>>,
    #[serde(borrow, default)]
    pub description: Option<Text<'a>>,
}

impl<'a> RuleView<'a> {
    fn of(rule: &'a FirewallRule) -> Self {
        let FirewallRule {
            direction,
            protocol,
            port,
            source_ips,
            destination_ips,
            description,
        } = rule;
        RuleView {
            direction: *direction,
            protocol: *protocol,
            port: optional(port),
            source_ips: source_ips.iter().map(|ip| text(ip)).collect(),
            destination_ips: destination_ips.iter().map(|ip| text(ip)).collect(),
            description: optional(description),
        }
    }

    pub fn is(&self, stored: &FirewallRule) -> bool {
        fn same(view: &[Text], stored: &[String]) -> bool {
            view.len() == stored.len() && view.iter().zip(stored).all(|(v, s)| v.as_str() == s)
        }
        self.direction == stored.direction
            && self.protocol == stored.protocol
            && self.port.as_ref().map(Text::as_str) == stored.port.as_deref()
            && same(&self.source_ips, &stored.source_ips)
            && same(&self.destination_ips, &stored.destination_ips)
            && self.description.as_ref().map(Text::as_str) == stored.description.as_deref()
    }

    pub fn owned(&self) -> FirewallRule {
        let strings = |texts: &[Text]| texts.iter().map(|t| t.as_str().to_owned()).collect();
        FirewallRule {
            direction: self.direction,
            protocol: self.protocol,
            port: self.port.as_ref().map(|p| p.as_str().to_owned()),
            source_ips: strings(&self.source_ips),
            destination_ips: strings(&self.destination_ips),
            description: self.description.as_ref().map(|d| d.as_str().to_owned()),
        }
    }
}
