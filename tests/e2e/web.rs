//! The chat page and the dashboard over HTTP ([`sockhost`'s `web` module]): which port
//! serves them with `[web]` on and off, their JSON, and the refusals of bad requests.
//! The pages' behaviour in a browser is in [`crate::browser`].

use serde_json::Value;

use crate::process::{spawn, work_dir};
use crate::support::*;

const PAGES: [&str; 7] =
    ["/", "/chat.js", "/addons.json", "/style.css", "/dashboard", "/dashboard.js", "/dashboard.json"];

async fn server_with(adjust: impl FnOnce(&mut sockhost::Config)) -> TestServer {
    let echo = bundled_addon("echo");
    TestServer::start_with(&[("echo.wasm", &echo)], adjust).await
}

fn with_admin(config: &mut sockhost::Config) {
    config.admin = Some(sockhost::AdminConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key_env: sockhost::config::DEFAULT_API_KEY_ENV.into(),
        api_key: None,
    });
}

/// A response header's value, by name in any case.
fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default()
}

async fn get_json(addr: std::net::SocketAddr, path: &str) -> Value {
    let (status, text) = http_get(addr, path).await;
    assert_eq!(status, 200, "{path}: {text}");
    assert_eq!(header(&text, "content-type"), Some("application/json"), "{text}");
    assert_eq!(header(&text, "cache-control"), Some("no-store"), "{text}");
    json_body(&text)
}

#[tokio::test]
async fn with_web_on_the_public_port_serves_the_chat_page_and_the_dashboard() {
    let server = server_with(|_| {}).await;
    for (path, content_type, marker) in [
        ("/", "text/html; charset=utf-8", r#"<script src="/chat.js" defer></script>"#),
        ("/chat.js", "text/javascript; charset=utf-8", "action: 'chat'"),
        ("/style.css", "text/css; charset=utf-8", ".msg-reply"),
        ("/dashboard", "text/html; charset=utf-8", r#"<script src="/dashboard.js" defer></script>"#),
        ("/dashboard.js", "text/javascript; charset=utf-8", "/dashboard.json"),
    ] {
        let (status, text) = http_get(server.addr, path).await;
        assert_eq!(status, 200, "{path}: {text}");
        assert_eq!(header(&text, "content-type"), Some(content_type), "{path}");
        assert!(body(&text).contains(marker), "{path} lacks {marker:?}");
        assert_eq!(header(&text, "content-length"), Some(body(&text).len().to_string().as_str()), "{path}");
        assert_eq!(header(&text, "x-content-type-options"), Some("nosniff"), "{path}");
    }
    // The pages may load and connect to this origin only.
    let (_, page) = http_get(server.addr, "/").await;
    let policy = header(&page, "content-security-policy").expect("a Content-Security-Policy");
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"), "{policy}");

    let list = get_json(server.addr, "/addons.json").await;
    assert_eq!(list, serde_json::json!({"addons": ["echo"], "dashboard": "/dashboard"}));

    // HEAD: the same head, no body.
    let (status, text) = http_request(server.addr, "HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(header(&text, "content-length"), Some(body(&page).len().to_string().as_str()));
    assert_eq!(body(&text), "", "HEAD has no body");
}

#[tokio::test]
async fn with_web_off_every_page_path_answers_404_and_websockets_still_work() {
    let server = server_with(|config| config.web_enabled = false).await;
    for path in PAGES {
        let (status, text) = http_get(server.addr, path).await;
        assert_eq!(status, 404, "{path}: {text}");
        assert!(text.contains("web pages are off") && text.contains("--no-web"), "{path}: {text}");
    }
    let mut client = server.connect("/ws/echo").await;
    client.send_text("still here").await;
    assert_eq!(client.recv_text().await, "still here");
}

/// The flag and the file key, in the real binary.
#[tokio::test]
async fn the_no_web_flag_and_the_web_section_turn_the_pages_off() {
    let work = work_dir(&[("addons/echo.wasm", &bundled_addon("echo"))]);
    let local = |process: &crate::process::Process| -> std::net::SocketAddr {
        format!("127.0.0.1:{}", process.port).parse().unwrap()
    };
    let on = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    assert_eq!(http_get(local(&on), "/").await.0, 200);
    on.wait_for_log("chat page http://localhost:");
    drop(on);

    let off = spawn(work.path(), &["--listen", "127.0.0.1", "--no-web"], &[("SOCKHOST_PORT", "0")]);
    for path in ["/", "/dashboard"] {
        let (status, text) = http_get(local(&off), path).await;
        assert_eq!(status, 404, "{path} with --no-web: {text}");
    }
    assert!(!off.log_text().contains("chat page"), "{}", off.log_text());
    drop(off);

    std::fs::write(work.path().join("sockhost.toml"), "[web]\nenabled = false\n").unwrap();
    let off = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    assert_eq!(http_get(local(&off), "/").await.0, 404, "[web] enabled = false");
    drop(off);

    // A typo in the section is named, not ignored.
    std::fs::write(work.path().join("sockhost.toml"), "[web]\nenable = false\n").unwrap();
    let (code, output) =
        crate::process::run_to_exit(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    assert_ne!(code, 0);
    assert!(output.contains("enable"), "{output}");
}

#[tokio::test]
async fn bad_methods_and_upgrades_on_the_pages_get_clear_4xx() {
    let server = server_with(|_| {}).await;
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        for path in ["/", "/dashboard.json"] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
            );
            let (status, text) = http_request(server.addr, &request).await;
            assert_eq!(status, 405, "{method} {path}: {text}");
            assert_eq!(header(&text, "allow"), Some("GET, HEAD"), "{text}");
            assert!(text.contains(&format!("{method} is not allowed here")), "{text}");
        }
    }
    // A method that is not a plain word is not echoed back.
    let (status, text) = http_request(server.addr, "G<b>T / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status == 400 || status == 405, "{text}");
    assert!(!text.contains("<b>"), "{text}");
    // None of these paths is a WebSocket endpoint: an upgrade is refused, not given a page.
    for path in ["/", "/dashboard"] {
        let (status, text) = upgrade_status(server.addr, path, None).await;
        assert_eq!(status, 404, "{path}: {text}");
        assert!(text.contains("WebSocket endpoints are /ws and /ws/<addon>"), "{text}");
    }
    // Near misses are unknown paths.
    for path in ["/index.html", "/dashboard/", "/chat.js/x", "/DASHBOARD"] {
        assert_eq!(http_get(server.addr, path).await.0, 404, "{path}");
    }
}

/// The dashboard's JSON reads the counters `/metrics` exposes: a real connection and
/// its messages move both the same way, and a refused request shows as a failure.
#[tokio::test]
async fn the_dashboard_numbers_move_with_a_real_connection() {
    let server = server_with(|_| {}).await;
    let echo = |snapshot: &Value| snapshot["addons"].as_array().unwrap()[0].clone();
    let before = get_json(server.addr, "/dashboard.json").await;
    assert_eq!(before["addons_mounted"], 1);
    let row = echo(&before);
    assert_eq!((row["name"].as_str(), row["mounted"].as_bool()), (Some("echo"), Some(true)));
    let version = row["version"].as_str().unwrap().to_owned();
    assert!(version.len() == 12 && version.bytes().all(|b| b.is_ascii_hexdigit()), "{version}");
    assert_eq!((row["open_connections"].as_u64(), row["messages_in_total"].as_u64()), (Some(0), Some(0)));

    let mut client = server.connect("/ws/echo").await;
    for text in ["one", "two", "three"] {
        client.send_text(text).await;
        assert_eq!(client.recv_text().await, text);
    }
    // Plain HTTP on the addon's path: a bad_request failure counted for echo.
    assert_eq!(http_get(server.addr, "/ws/echo").await.0, 426);

    let during = get_json(server.addr, "/dashboard.json").await;
    let row = echo(&during);
    assert_eq!(row["open_connections"], 1, "{row}");
    assert_eq!(row["connections_total"], 1, "{row}");
    assert_eq!(row["live_instances"], 1, "{row}");
    assert_eq!(row["messages_in_total"], 3, "{row}");
    assert_eq!(row["messages_out_total"], 3, "{row}");
    assert_eq!(row["bytes_in_total"], 11, "{row}");
    assert_eq!(row["failures"]["bad_request"], 1, "{row}");
    assert!(during["failures"]["bad_request"].as_u64().unwrap() >= 1, "{during}");
    assert!(during["uptime_seconds"].as_f64() > before["uptime_seconds"].as_f64());
    // The same numbers as /metrics.
    for (field, series) in [
        ("open_connections", "sockhost_addon_open_connections{addon=\"echo\"}"),
        ("messages_in_total", "sockhost_addon_messages_in_total{addon=\"echo\"}"),
        ("messages_out_total", "sockhost_addon_messages_out_total{addon=\"echo\"}"),
    ] {
        assert_eq!(server.metric(series).await, row[field].as_f64(), "{field}");
    }
    assert_eq!(
        server.metric("sockhost_instance_slots").await,
        during["instance_slots"].as_f64(),
        "instance slots"
    );

    client.close(1000, "done").await;
    eventually("the dashboard shows the connection closed", || async {
        echo(&get_json(server.addr, "/dashboard.json").await)["open_connections"] == 0
    })
    .await;
}

#[tokio::test]
async fn with_an_admin_listener_the_dashboard_is_there_and_not_on_the_public_port() {
    let server = server_with(with_admin).await;
    let admin = server.admin.unwrap();
    for path in ["/dashboard", "/dashboard.js", "/dashboard.json"] {
        let (status, text) = http_get(server.addr, path).await;
        assert_eq!(status, 404, "public {path}: {text}");
        assert!(text.contains("admin listener"), "{text}");
        assert_eq!(http_get(admin, path).await.0, 200, "admin {path}");
    }
    assert_eq!(http_get(admin, "/style.css").await.0, 200, "the dashboard's style is on the admin listener");
    assert_eq!(get_json(admin, "/dashboard.json").await["addons"][0]["name"], "echo");
    // The chat page stays public, and does not point at the admin listener.
    assert_eq!(http_get(server.addr, "/").await.0, 200);
    assert_eq!(get_json(server.addr, "/addons.json").await["dashboard"], Value::Null);
    for path in ["/", "/chat.js", "/addons.json"] {
        assert_eq!(http_get(admin, path).await.0, 404, "admin {path}: the chat page is public only");
    }
    let (status, text) = http_post(admin, "/dashboard.json", None, "{}").await;
    assert_eq!((status, header(&text, "allow")), (405, Some("GET, HEAD")), "{text}");

    // With the public pages off, the admin listener keeps its dashboard.
    let server = server_with(|config| {
        with_admin(config);
        config.web_enabled = false;
    })
    .await;
    assert_eq!(http_get(server.addr, "/").await.0, 404);
    assert_eq!(http_get(server.admin.unwrap(), "/dashboard").await.0, 200);
}

/// `[web] enabled` is read on each request: a configuration reload (SIGHUP) turns the
/// pages off and on without a restart.
#[tokio::test]
async fn a_reload_turns_the_pages_off_and_on() {
    let server = server_with(|_| {}).await;
    let config = |web_enabled| sockhost::Config { web_enabled, ..sockhost::Config::default() };
    server.handle.reload_config(config(false));
    assert_eq!(http_get(server.addr, "/").await.0, 404);
    server.handle.reload_config(config(true));
    assert_eq!(http_get(server.addr, "/").await.0, 200);
}
