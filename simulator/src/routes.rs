//! Path matching under `/v1`, by hand: we need the path template for statistics, a JSON 404/405,
//! and to know before running a handler whether it creates actions (fault injection).

use axum::http::Method;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServerVerb {
    PowerOn,
    PowerOff,
    Shutdown,
    Reboot,
    Reset,
    Rebuild,
    ChangeType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FirewallVerb {
    SetRules,
    ApplyToResources,
    RemoveFromResources,
}

/// IDs that are not numbers become 0, which never exists (→ 404 `not_found`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ListServers,
    CreateServer,
    GetServer(i64),
    UpdateServer(i64),
    DeleteServer(i64),
    ServerAction(i64, ServerVerb),
    ListServerActions(i64),
    GetServerAction(i64, i64),
    ListAllServerActions,
    GetAnyServerAction(i64),
    ListSshKeys,
    CreateSshKey,
    GetSshKey(i64),
    UpdateSshKey(i64),
    DeleteSshKey(i64),
    ListFirewalls,
    CreateFirewall,
    GetFirewall(i64),
    UpdateFirewall(i64),
    DeleteFirewall(i64),
    FirewallAction(i64, FirewallVerb),
    ListFirewallActions(i64),
    GetFirewallAction(i64, i64),
    ListAllFirewallActions,
    GetAnyFirewallAction(i64),
    GetActions,
    GetAction(i64),
    ListServerTypes,
    GetServerType(i64),
    ListImages,
    GetImage(i64),
    UpdateImage(i64),
    DeleteImage(i64),
    /// `POST /servers/{id}/actions/create_image`: answers `{image, action}`, unlike the other
    /// server actions.
    CreateImage(i64),
    ListLocations,
    GetLocation(i64),
}

impl Endpoint {
    /// Requests that start actions; only these can get the "action ends in error" fault.
    pub(crate) fn creates_actions(self) -> bool {
        matches!(
            self,
            Endpoint::CreateServer
                | Endpoint::DeleteServer(_)
                | Endpoint::ServerAction(..)
                | Endpoint::CreateImage(_)
                | Endpoint::CreateFirewall
                | Endpoint::FirewallAction(..)
        )
    }
}

pub(crate) enum Routed {
    Found {
        template: &'static str,
        endpoint: Endpoint,
    },
    WrongMethod {
        template: &'static str,
    },
    NotFound,
}

fn id(segment: &str) -> i64 {
    match segment.parse::<i64>() {
        Ok(n) if n >= 1 => n,
        _ => 0,
    }
}

fn is_number(segment: &str) -> bool {
    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit())
}

fn server_verb(verb: &str) -> Option<(&'static str, ServerVerb)> {
    Some(match verb {
        "poweron" => ("/servers/{id}/actions/poweron", ServerVerb::PowerOn),
        "poweroff" => ("/servers/{id}/actions/poweroff", ServerVerb::PowerOff),
        "shutdown" => ("/servers/{id}/actions/shutdown", ServerVerb::Shutdown),
        "reboot" => ("/servers/{id}/actions/reboot", ServerVerb::Reboot),
        "reset" => ("/servers/{id}/actions/reset", ServerVerb::Reset),
        "rebuild" => ("/servers/{id}/actions/rebuild", ServerVerb::Rebuild),
        "change_type" => ("/servers/{id}/actions/change_type", ServerVerb::ChangeType),
        _ => return None,
    })
}

fn firewall_verb(verb: &str) -> Option<(&'static str, FirewallVerb)> {
    Some(match verb {
        "set_rules" => ("/firewalls/{id}/actions/set_rules", FirewallVerb::SetRules),
        "apply_to_resources" => (
            "/firewalls/{id}/actions/apply_to_resources",
            FirewallVerb::ApplyToResources,
        ),
        "remove_from_resources" => (
            "/firewalls/{id}/actions/remove_from_resources",
            FirewallVerb::RemoveFromResources,
        ),
        _ => return None,
    })
}

/// Matches `path` (which starts with `/v1`).
pub(crate) fn route(method: &Method, path: &str) -> Routed {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Routed::NotFound;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    use Endpoint as E;
    let get = Method::GET;
    let post = Method::POST;
    let put = Method::PUT;
    let delete = Method::DELETE;
    let (template, options): (&'static str, Vec<(Method, Endpoint)>) = match segments.as_slice() {
        ["servers"] => (
            "/servers",
            vec![(get, E::ListServers), (post, E::CreateServer)],
        ),
        ["servers", "actions"] => ("/servers/actions", vec![(get, E::ListAllServerActions)]),
        ["servers", "actions", a] if is_number(a) => (
            "/servers/actions/{id}",
            vec![(get, E::GetAnyServerAction(id(a)))],
        ),
        ["servers", s] => (
            "/servers/{id}",
            vec![
                (get, E::GetServer(id(s))),
                (put, E::UpdateServer(id(s))),
                (delete, E::DeleteServer(id(s))),
            ],
        ),
        ["servers", s, "actions"] => (
            "/servers/{id}/actions",
            vec![(get, E::ListServerActions(id(s)))],
        ),
        ["servers", s, "actions", "create_image"] => (
            "/servers/{id}/actions/create_image",
            vec![(post, E::CreateImage(id(s)))],
        ),
        ["servers", s, "actions", verb] => match server_verb(verb) {
            Some((template, verb)) => (template, vec![(post, E::ServerAction(id(s), verb))]),
            None if is_number(verb) => (
                "/servers/{id}/actions/{action_id}",
                vec![(get, E::GetServerAction(id(s), id(verb)))],
            ),
            None => return Routed::NotFound,
        },
        ["ssh_keys"] => (
            "/ssh_keys",
            vec![(get, E::ListSshKeys), (post, E::CreateSshKey)],
        ),
        ["ssh_keys", k] => (
            "/ssh_keys/{id}",
            vec![
                (get, E::GetSshKey(id(k))),
                (put, E::UpdateSshKey(id(k))),
                (delete, E::DeleteSshKey(id(k))),
            ],
        ),
        ["firewalls"] => (
            "/firewalls",
            vec![(get, E::ListFirewalls), (post, E::CreateFirewall)],
        ),
        ["firewalls", "actions"] => ("/firewalls/actions", vec![(get, E::ListAllFirewallActions)]),
        ["firewalls", "actions", a] if is_number(a) => (
            "/firewalls/actions/{id}",
            vec![(get, E::GetAnyFirewallAction(id(a)))],
        ),
        ["firewalls", f] => (
            "/firewalls/{id}",
            vec![
                (get, E::GetFirewall(id(f))),
                (put, E::UpdateFirewall(id(f))),
                (delete, E::DeleteFirewall(id(f))),
            ],
        ),
        ["firewalls", f, "actions"] => (
            "/firewalls/{id}/actions",
            vec![(get, E::ListFirewallActions(id(f)))],
        ),
        ["firewalls", f, "actions", verb] => match firewall_verb(verb) {
            Some((template, verb)) => (template, vec![(post, E::FirewallAction(id(f), verb))]),
            None if is_number(verb) => (
                "/firewalls/{id}/actions/{action_id}",
                vec![(get, E::GetFirewallAction(id(f), id(verb)))],
            ),
            None => return Routed::NotFound,
        },
        ["actions"] => ("/actions", vec![(get, E::GetActions)]),
        ["actions", a] => ("/actions/{id}", vec![(get, E::GetAction(id(a)))]),
        ["server_types"] => ("/server_types", vec![(get, E::ListServerTypes)]),
        ["server_types", t] => ("/server_types/{id}", vec![(get, E::GetServerType(id(t)))]),
        ["images"] => ("/images", vec![(get, E::ListImages)]),
        ["images", i] => (
            "/images/{id}",
            vec![
                (get, E::GetImage(id(i))),
                (put, E::UpdateImage(id(i))),
                (delete, E::DeleteImage(id(i))),
            ],
        ),
        ["locations"] => ("/locations", vec![(get, E::ListLocations)]),
        ["locations", l] => ("/locations/{id}", vec![(get, E::GetLocation(id(l)))]),
        _ => return Routed::NotFound,
    };
    // Empty segments ("/servers//actions") are not routes.
    if segments.iter().any(|s| s.is_empty()) {
        return Routed::NotFound;
    }
    match options.into_iter().find(|(m, _)| m == method) {
        Some((_, endpoint)) => Routed::Found { template, endpoint },
        None => Routed::WrongMethod { template },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(method: Method, path: &str) -> Option<&'static str> {
        match route(&method, path) {
            Routed::Found { template, .. } => Some(template),
            _ => None,
        }
    }

    #[test]
    fn templates() {
        assert_eq!(template(Method::GET, "/v1/servers"), Some("/servers"));
        assert_eq!(
            template(Method::POST, "/v1/servers/7/actions/poweron"),
            Some("/servers/{id}/actions/poweron")
        );
        assert_eq!(
            template(Method::GET, "/v1/servers/7/actions/9"),
            Some("/servers/{id}/actions/{action_id}")
        );
        assert_eq!(
            template(Method::POST, "/v1/servers/7/actions/create_image"),
            Some("/servers/{id}/actions/create_image")
        );
        assert_eq!(
            template(Method::DELETE, "/v1/images/4"),
            Some("/images/{id}")
        );
        assert!(matches!(
            route(&Method::PATCH, "/v1/servers/7"),
            Routed::WrongMethod { .. }
        ));
        assert!(matches!(
            route(&Method::GET, "/v1/servers/7/actions/poweron"),
            Routed::WrongMethod { .. }
        ));
        assert!(matches!(
            route(&Method::GET, "/v1/volumes"),
            Routed::NotFound
        ));
        assert!(matches!(
            route(&Method::GET, "/v1/servers/"),
            Routed::NotFound
        ));
        assert!(matches!(
            route(&Method::POST, "/v1/servers/1/actions/enable_rescue"),
            Routed::NotFound
        ));
    }
}
