//! The browser side of sockhost: a chat page at `/`, an operators' dashboard at
//! `/dashboard`, and the two small JSON documents they read.
//!
//! Why it exists: nobody should have to write a client to see sockhost answer, so `/`
//! is a chat box on `/ws/aikefu` (any mounted addon can be picked, with every frame
//! shown raw). Its script (`web/chat.js`) speaks the seed protocol exactly and is kept
//! readable: it doubles as the reference browser client. The dashboard shows an
//! operator without Prometheus what `/metrics` counts.
//!
//! Why it is built this way: the files under `runtime/src/web/` are plain HTML, CSS and
//! JavaScript embedded with `include_str!`. There is no build step and nothing to deploy
//! beside the binary, and the pages load nothing from elsewhere (no CDN, no web font),
//! so they work on a machine without internet access and their Content-Security-Policy
//! allows this origin only.
//!
//! | path | what |
//! |---|---|
//! | `/`, `/chat.js` | the chat page |
//! | `/addons.json` | `{"addons": ["aikefu", ...], "dashboard": "/dashboard"}` (`null` when the dashboard is not on this port) |
//! | `/dashboard`, `/dashboard.js` | the dashboard |
//! | `/dashboard.json` | the numbers it shows (see [`dashboard_json`]) |
//! | `/style.css` | shared by both pages |
//!
//! Where each is served is the listeners' decision ([`Resource::audience`]): the chat
//! page on the public port when `[web] enabled` (`crate::server`); the dashboard on the
//! admin listener when there is one (`crate::admin`), otherwise on the public port when
//! `[web] enabled`, beside `/metrics`, which is public then too. Only `GET` and `HEAD`
//! are answered; another method gets 405 naming them. The dashboard's numbers are read
//! at request time from the handles `/metrics` encodes ([`crate::metrics`]): nothing is
//! sampled in the background, and the page turns counters into rates itself.

use serde_json::{Value, json};

use crate::error::{FailureCounts, FailureKind};
use crate::handshake::Answer;
use crate::metrics::Metrics;
use crate::reload::Mounted;

const CHAT_HTML: &str = include_str!("web/index.html");
const CHAT_JS: &str = include_str!("web/chat.js");
const DASHBOARD_HTML: &str = include_str!("web/dashboard.html");
const DASHBOARD_JS: &str = include_str!("web/dashboard.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// Scripts, styles, `fetch` and WebSockets to this origin only (CSP Level 3 counts
/// `ws:`/`wss:` to the page's own host and port as `'self'`); the favicon is an empty
/// `data:` URL. Nothing may frame the pages or be posted from them.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A path this module answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    ChatPage,
    ChatScript,
    AddonList,
    Dashboard,
    DashboardScript,
    DashboardData,
    Style,
}

/// Which page a resource belongs to, so a listener can tell whether it serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Audience {
    /// The chat page's: the public port, when `[web] enabled`.
    Chat,
    /// The dashboard's: the admin listener, or the public port without one.
    Dashboard,
    /// Both pages use it: wherever either is served.
    Both,
}

impl Resource {
    pub(crate) fn from_path(path: &str) -> Option<Resource> {
        Some(match path {
            "/" => Resource::ChatPage,
            "/chat.js" => Resource::ChatScript,
            "/addons.json" => Resource::AddonList,
            "/dashboard" => Resource::Dashboard,
            "/dashboard.js" => Resource::DashboardScript,
            "/dashboard.json" => Resource::DashboardData,
            "/style.css" => Resource::Style,
            _ => return None,
        })
    }

    pub(crate) fn audience(self) -> Audience {
        match self {
            Resource::ChatPage | Resource::ChatScript | Resource::AddonList => Audience::Chat,
            Resource::Dashboard | Resource::DashboardScript | Resource::DashboardData => Audience::Dashboard,
            Resource::Style => Audience::Both,
        }
    }
}

/// What the answers are built from.
pub(crate) struct Sources<'a> {
    pub(crate) mounted: &'a Mounted,
    pub(crate) metrics: &'a Metrics,
    /// Whether the dashboard is on the same listener, so the chat page links to it; not
    /// when it is on the admin listener, whose address the public page must not learn.
    pub(crate) dashboard_here: bool,
}

/// Answers `method` on `resource`, which the caller's listener serves.
pub(crate) fn answer(method: &str, resource: Resource, sources: &Sources<'_>) -> Answer {
    let send_body = match method {
        "GET" => true,
        "HEAD" => false,
        other => {
            // The method is the client's: shown only when it is a plain token.
            let shown = if other.len() <= 16 && other.bytes().all(|b| b.is_ascii_alphabetic()) {
                other
            } else {
                "this method"
            };
            return Answer::text(
                405,
                format!("{shown} is not allowed here: these pages answer GET and HEAD"),
            )
            .with_header("Allow", "GET, HEAD");
        }
    };
    let mut answer = match resource {
        Resource::ChatPage => page(CHAT_HTML),
        Resource::Dashboard => page(DASHBOARD_HTML),
        Resource::ChatScript => asset("text/javascript; charset=utf-8", CHAT_JS),
        Resource::DashboardScript => asset("text/javascript; charset=utf-8", DASHBOARD_JS),
        Resource::Style => asset("text/css; charset=utf-8", STYLE_CSS),
        Resource::AddonList => data(addon_list_json(sources)),
        Resource::DashboardData => data(dashboard_json(sources.mounted, sources.metrics)),
    };
    answer.send_body = send_body;
    answer
}

/// An HTML page: the policy above, never framed, revalidated on each load so an
/// upgraded server's page shows at once.
fn page(html: &'static str) -> Answer {
    Answer::new(200, "text/html; charset=utf-8", html)
        .with_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Referrer-Policy", "no-referrer")
        .with_header("Cache-Control", "no-cache")
}

fn asset(content_type: &'static str, text: &'static str) -> Answer {
    Answer::new(200, content_type, text)
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Cache-Control", "no-cache")
}

/// Live numbers: never cached.
fn data(value: Value) -> Answer {
    let mut answer = Answer::json(200, value);
    answer.headers.push(("Cache-Control", "no-store"));
    answer.headers.push(("X-Content-Type-Options", "nosniff"));
    answer
}

/// `/addons.json`: the names the page's selector offers (what the `/ws` greeting and a
/// 404 on `/ws/<name>` already tell anyone), and where the dashboard is.
fn addon_list_json(sources: &Sources<'_>) -> Value {
    let set = sources.mounted.get();
    let names: Vec<&str> = set.names().collect();
    json!({
        "addons": names,
        "dashboard": sources.dashboard_here.then_some("/dashboard"),
    })
}

/// `/dashboard.json`: a snapshot of the counters `/metrics` exposes.
///
/// ```json
/// {"uptime_seconds": 12.5, "addons_mounted": 2, "instance_slots": 10000,
///  "failures": {"addon_trap": 0, ...},
///  "addons": [{"name": "aikefu", "version": "3f2a...", "mounted": true,
///              "open_connections": 1, "connections_total": 3, "live_instances": 1,
///              "hibernated_connections": 0, "messages_in_total": 4, "messages_out_total": 40,
///              "bytes_in_total": 300, "bytes_out_total": 2000, "failures": {...}}]}
/// ```
///
/// Counters are totals since start; the page divides the change between two snapshots
/// by the change of `uptime_seconds` to show rates. Every failure kind is listed, zeros
/// included, as in `/metrics`. An addon whose file was removed stays listed
/// (`"mounted": false`) while connections to its last version are open.
pub(crate) fn dashboard_json(mounted: &Mounted, metrics: &Metrics) -> Value {
    let set = mounted.get();
    let mut addons = Vec::new();
    for (name, stats) in metrics.addon_stats() {
        let addon = set.get(&name);
        let open = stats.open_connections();
        if addon.is_none() && open == 0 {
            continue;
        }
        addons.push(json!({
            "name": name,
            "version": addon.map(|addon| addon.version()),
            "mounted": addon.is_some(),
            "open_connections": open,
            "connections_total": stats.connections.get(),
            "live_instances": stats.live_instances.get(),
            "hibernated_connections": stats.hibernated.get(),
            "messages_in_total": stats.messages_in.get(),
            "messages_out_total": stats.messages_out.get(),
            "bytes_in_total": stats.bytes_in.get(),
            "bytes_out_total": stats.bytes_out.get(),
            "failures": failures_json(&stats.failures),
        }));
    }
    json!({
        "uptime_seconds": metrics.uptime().as_secs_f64(),
        "addons_mounted": set.len(),
        "instance_slots": metrics.instance_slots(),
        "failures": failures_json(metrics.failures()),
        "addons": addons,
    })
}

fn failures_json(counts: &FailureCounts) -> Value {
    FailureKind::ALL.iter().map(|&kind| (kind.code().to_owned(), json!(counts.get(kind)))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addons::AddonSet;

    fn sources<'a>(mounted: &'a Mounted, metrics: &'a Metrics) -> Sources<'a> {
        Sources { mounted, metrics, dashboard_here: true }
    }

    #[test]
    fn every_path_maps_to_its_resource_and_its_page() {
        for (path, audience) in [
            ("/", Audience::Chat),
            ("/chat.js", Audience::Chat),
            ("/addons.json", Audience::Chat),
            ("/dashboard", Audience::Dashboard),
            ("/dashboard.js", Audience::Dashboard),
            ("/dashboard.json", Audience::Dashboard),
            ("/style.css", Audience::Both),
        ] {
            assert_eq!(Resource::from_path(path).map(Resource::audience), Some(audience), "{path}");
        }
        for path in ["", "/index.html", "/dashboard/", "/chat.js/", "/ws", "/Dashboard"] {
            assert_eq!(Resource::from_path(path), None, "{path}");
        }
    }

    #[test]
    fn only_get_and_head_are_answered_and_head_has_no_body() {
        let (mounted, metrics) = (Mounted::new(AddonSet::default()), Metrics::new(Default::default()));
        let sources = sources(&mounted, &metrics);
        let get = answer("GET", Resource::ChatPage, &sources);
        assert_eq!((get.status, get.send_body), (200, true));
        let head = answer("HEAD", Resource::ChatPage, &sources);
        assert_eq!((head.status, head.send_body, head.body.len()), (200, false, get.body.len()));
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "get", "X<script>"] {
            let refused = answer(method, Resource::ChatPage, &sources);
            assert_eq!(refused.status, 405, "{method}");
            assert!(refused.headers.contains(&("Allow", "GET, HEAD")), "{method}");
            assert!(!refused.body.contains('<'), "the client's text is not echoed as is: {}", refused.body);
        }
    }

    /// No page may load anything from another origin: every `src` and `href` is a path
    /// on this server, a fragment or a `data:` URL, and no script or style names a URL.
    #[test]
    fn the_pages_load_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", CHAT_HTML),
            ("dashboard.html", DASHBOARD_HTML),
            ("chat.js", CHAT_JS),
            ("dashboard.js", DASHBOARD_JS),
            ("style.css", STYLE_CSS),
        ] {
            for marker in ["http://", "https://", "url(", "@import", "//cdn", "fonts.g"] {
                assert!(!text.contains(marker), "{name} contains {marker:?}");
            }
            for attribute in ["src=\"", "href=\""] {
                for (at, _) in text.match_indices(attribute) {
                    let value = &text[at + attribute.len()..];
                    assert!(
                        (value.starts_with('/') && !value.starts_with("//"))
                            || value.starts_with('#')
                            || value.starts_with("data:"),
                        "{name}: {attribute}{}",
                        &value[..value.len().min(40)]
                    );
                }
            }
        }
    }

    #[test]
    fn the_dashboard_lists_every_failure_kind_and_the_counters_of_each_addon() {
        let failures = std::sync::Arc::new(FailureCounts::default());
        let metrics = Metrics::new(failures.clone());
        let mounted = Mounted::new(AddonSet::default());
        let gone = metrics.addon("gone");
        gone.message_in(3);
        gone.failure(FailureKind::AddonTrap);
        // Unmounted and without connections: not listed.
        let snapshot = dashboard_json(&mounted, &metrics);
        assert_eq!(snapshot["addons"], json!([]));
        assert_eq!(snapshot["failures"]["addon_trap"], 1);
        assert_eq!(snapshot["failures"].as_object().unwrap().len(), FailureKind::ALL.len());
        // Still holding a connection: listed, as not mounted.
        assert!(gone.try_open(10));
        let snapshot = dashboard_json(&mounted, &metrics);
        let row = &snapshot["addons"][0];
        assert_eq!((row["name"].clone(), row["mounted"].clone()), (json!("gone"), json!(false)));
        assert_eq!(row["open_connections"], 1);
        // One message of 3 bytes.
        assert_eq!((row["messages_in_total"].clone(), row["bytes_in_total"].clone()), (json!(1), json!(3)));
        assert_eq!(row["failures"]["addon_trap"], 1);
        assert!(snapshot["uptime_seconds"].as_f64().unwrap() >= 0.0);
    }
}
