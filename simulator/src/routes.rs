//! The `/v1` route table, served by axum's `Router`.
//!
//! Each path template is one axum route; its handler picks the [`Endpoint`] for the method and
//! hands the request to the pipeline in `lib.rs` (count → rate limit → auth → 404/405 → fault →
//! handler), so even unroutable requests are counted, rate limited and authenticated first. The
//! template, without `/v1`, is also the statistics key (`GET /servers/{id}`).
//!
//! Methods are matched here rather than by axum's `MethodRouter`, which would answer `HEAD` with
//! the `GET` handler and add an `Allow` header: the simulator answers any method a route does not
//! list with Hetzner's JSON 405 `method_not_allowed`, as it always has.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::routing::any;

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

/// The raw (still percent-encoded) path segments a route matched, by template parameter name.
pub(crate) struct Segments<'p> {
    template: &'static str,
    path: &'p str,
}

impl Segments<'_> {
    fn raw(&self, name: &str) -> &str {
        self.template
            .split('/')
            .zip(self.path.split('/'))
            .find(|(t, _)| t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) == Some(name))
            .map_or("", |(_, segment)| segment)
    }

    /// `{id}`; not a positive number → 0, which never exists (→ 404 `not_found`).
    fn id(&self) -> i64 {
        id(self.raw("id"))
    }

    fn action_id(&self) -> i64 {
        id(self.raw("action_id"))
    }
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

type Make = fn(&Segments) -> Endpoint;

/// One path template and the endpoint behind each method it accepts.
struct Route {
    template: &'static str,
    methods: &'static [(Method, Make)],
    /// A parameter that must be all digits, else the path is not a route (404): where a word
    /// there would name an action the simulator does not have (`/servers/1/actions/enable_rescue`).
    number: Option<&'static str>,
}

const fn route(template: &'static str, methods: &'static [(Method, Make)]) -> Route {
    Route {
        template,
        methods,
        number: None,
    }
}

/// A route whose parameter `number` must be all digits.
const fn numeric(
    template: &'static str,
    number: &'static str,
    methods: &'static [(Method, Make)],
) -> Route {
    Route {
        template,
        methods,
        number: Some(number),
    }
}

use Endpoint as E;
use FirewallVerb as FV;
use ServerVerb as SV;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;
const DELETE: Method = Method::DELETE;

const ROUTES: &[Route] = &[
    route(
        "/servers",
        &[(GET, |_| E::ListServers), (POST, |_| E::CreateServer)],
    ),
    route("/servers/actions", &[(GET, |_| E::ListAllServerActions)]),
    numeric(
        "/servers/actions/{id}",
        "id",
        &[(GET, |s| E::GetAnyServerAction(s.id()))],
    ),
    route(
        "/servers/{id}",
        &[
            (GET, |s| E::GetServer(s.id())),
            (PUT, |s| E::UpdateServer(s.id())),
            (DELETE, |s| E::DeleteServer(s.id())),
        ],
    ),
    route(
        "/servers/{id}/actions",
        &[(GET, |s| E::ListServerActions(s.id()))],
    ),
    numeric(
        "/servers/{id}/actions/{action_id}",
        "action_id",
        &[(GET, |s| E::GetServerAction(s.id(), s.action_id()))],
    ),
    route(
        "/servers/{id}/actions/create_image",
        &[(POST, |s| E::CreateImage(s.id()))],
    ),
    route(
        "/servers/{id}/actions/poweron",
        &[(POST, |s| E::ServerAction(s.id(), SV::PowerOn))],
    ),
    route(
        "/servers/{id}/actions/poweroff",
        &[(POST, |s| E::ServerAction(s.id(), SV::PowerOff))],
    ),
    route(
        "/servers/{id}/actions/shutdown",
        &[(POST, |s| E::ServerAction(s.id(), SV::Shutdown))],
    ),
    route(
        "/servers/{id}/actions/reboot",
        &[(POST, |s| E::ServerAction(s.id(), SV::Reboot))],
    ),
    route(
        "/servers/{id}/actions/reset",
        &[(POST, |s| E::ServerAction(s.id(), SV::Reset))],
    ),
    route(
        "/servers/{id}/actions/rebuild",
        &[(POST, |s| E::ServerAction(s.id(), SV::Rebuild))],
    ),
    route(
        "/servers/{id}/actions/change_type",
        &[(POST, |s| E::ServerAction(s.id(), SV::ChangeType))],
    ),
    route(
        "/ssh_keys",
        &[(GET, |_| E::ListSshKeys), (POST, |_| E::CreateSshKey)],
    ),
    route(
        "/ssh_keys/{id}",
        &[
            (GET, |s| E::GetSshKey(s.id())),
            (PUT, |s| E::UpdateSshKey(s.id())),
            (DELETE, |s| E::DeleteSshKey(s.id())),
        ],
    ),
    route(
        "/firewalls",
        &[(GET, |_| E::ListFirewalls), (POST, |_| E::CreateFirewall)],
    ),
    route(
        "/firewalls/actions",
        &[(GET, |_| E::ListAllFirewallActions)],
    ),
    numeric(
        "/firewalls/actions/{id}",
        "id",
        &[(GET, |s| E::GetAnyFirewallAction(s.id()))],
    ),
    route(
        "/firewalls/{id}",
        &[
            (GET, |s| E::GetFirewall(s.id())),
            (PUT, |s| E::UpdateFirewall(s.id())),
            (DELETE, |s| E::DeleteFirewall(s.id())),
        ],
    ),
    route(
        "/firewalls/{id}/actions",
        &[(GET, |s| E::ListFirewallActions(s.id()))],
    ),
    numeric(
        "/firewalls/{id}/actions/{action_id}",
        "action_id",
        &[(GET, |s| E::GetFirewallAction(s.id(), s.action_id()))],
    ),
    route(
        "/firewalls/{id}/actions/set_rules",
        &[(POST, |s| E::FirewallAction(s.id(), FV::SetRules))],
    ),
    route(
        "/firewalls/{id}/actions/apply_to_resources",
        &[(POST, |s| E::FirewallAction(s.id(), FV::ApplyToResources))],
    ),
    route(
        "/firewalls/{id}/actions/remove_from_resources",
        &[(POST, |s| E::FirewallAction(s.id(), FV::RemoveFromResources))],
    ),
    route("/actions", &[(GET, |_| E::GetActions)]),
    route("/actions/{id}", &[(GET, |s| E::GetAction(s.id()))]),
    route("/server_types", &[(GET, |_| E::ListServerTypes)]),
    route("/server_types/{id}", &[(GET, |s| E::GetServerType(s.id()))]),
    route("/images", &[(GET, |_| E::ListImages)]),
    route(
        "/images/{id}",
        &[
            (GET, |s| E::GetImage(s.id())),
            (PUT, |s| E::UpdateImage(s.id())),
            (DELETE, |s| E::DeleteImage(s.id())),
        ],
    ),
    route("/locations", &[(GET, |_| E::ListLocations)]),
    route("/locations/{id}", &[(GET, |s| E::GetLocation(s.id()))]),
];

impl Route {
    /// What a request whose path this route matched asks for. `path` is the whole path (`/v1/…`).
    fn resolve(&self, method: &Method, path: &str) -> Routed {
        let segments = Segments {
            template: self.template,
            path: path.strip_prefix("/v1").unwrap_or(path),
        };
        // Empty segments ("/servers//actions") are not routes.
        if segments.path.split('/').skip(1).any(str::is_empty)
            || self
                .number
                .is_some_and(|name| !is_number(segments.raw(name)))
        {
            return Routed::NotFound;
        }
        match self.methods.iter().find(|(m, _)| m == method) {
            Some((_, make)) => Routed::Found {
                template: self.template,
                endpoint: make(&segments),
            },
            None => Routed::WrongMethod {
                template: self.template,
            },
        }
    }
}

/// Whether `key` is the `"METHOD /template"` (stats key) of a route, e.g. `"POST /servers"`.
pub(crate) fn is_endpoint_key(key: &str) -> bool {
    let Some((method, template)) = key.split_once(' ') else {
        return false;
    };
    ROUTES
        .iter()
        .any(|r| r.template == template && r.methods.iter().any(|(m, _)| m.as_str() == method))
}

/// Every `/v1` route. Requests that match none are left to the fallback in `lib.rs`.
pub(crate) fn router() -> Router<Arc<crate::Shared>> {
    ROUTES.iter().fold(Router::new(), |router, route| {
        router.route(
            &format!("/v1{}", route.template),
            any(
                move |State(shared): State<Arc<crate::Shared>>, request: Request| async move {
                    let routed = route.resolve(request.method(), request.uri().path());
                    crate::api_request(shared, routed, request).await
                },
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `path` resolved by the route with this template (axum's router picks the route; see
    /// `tests/simulator.rs` for requests through it).
    fn resolve(template: &str, method: Method, path: &str) -> Routed {
        let route = ROUTES.iter().find(|r| r.template == template);
        route.map_or(Routed::NotFound, |r| r.resolve(&method, path))
    }

    #[test]
    fn segments_methods_and_numbers() {
        assert!(matches!(
            resolve(
                "/servers/{id}/actions/{action_id}",
                Method::GET,
                "/v1/servers/7/actions/9"
            ),
            Routed::Found {
                template: "/servers/{id}/actions/{action_id}",
                endpoint: Endpoint::GetServerAction(7, 9)
            }
        ));
        assert!(matches!(
            resolve(
                "/servers/{id}/actions/{action_id}",
                Method::POST,
                "/v1/servers/7/actions/enable_rescue"
            ),
            Routed::NotFound
        ));
        assert!(matches!(
            resolve("/servers/{id}", Method::GET, "/v1/servers/x"),
            Routed::Found {
                endpoint: Endpoint::GetServer(0),
                ..
            }
        ));
        assert!(matches!(
            resolve(
                "/servers/{id}",
                Method::DELETE,
                "/v1/servers/99999999999999999999"
            ),
            Routed::Found {
                endpoint: Endpoint::DeleteServer(0),
                ..
            }
        ));
        assert!(matches!(
            resolve("/images/{id}", Method::PUT, "/v1/images/4"),
            Routed::Found {
                endpoint: Endpoint::UpdateImage(4),
                ..
            }
        ));
        assert!(matches!(
            resolve("/servers/{id}", Method::PATCH, "/v1/servers/7"),
            Routed::WrongMethod {
                template: "/servers/{id}"
            }
        ));
        // axum would send HEAD to the GET handler; Hetzner's API answers 405.
        assert!(matches!(
            resolve("/servers", Method::HEAD, "/v1/servers"),
            Routed::WrongMethod {
                template: "/servers"
            }
        ));
        assert!(matches!(
            resolve(
                "/servers/{id}/actions/poweron",
                Method::GET,
                "/v1/servers/7/actions/poweron"
            ),
            Routed::WrongMethod { .. }
        ));
        assert!(matches!(
            resolve(
                "/servers/actions/{id}",
                Method::GET,
                "/v1/servers/actions/x"
            ),
            Routed::NotFound
        ));
    }

    /// axum accepts every template (valid syntax, no two alike); it panics otherwise.
    #[test]
    fn router_builds() {
        let _ = router();
    }
}
