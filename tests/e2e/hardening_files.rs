//! Hardening (issue 13, items 6, 8 and 9) against the real binary: what the process
//! writes about its files and its clients. Errors in config files never quote the file;
//! the data and cache directories are private and a cache that others could have written
//! is never loaded; log lines with client text are short and few.

use std::time::Duration;

use crate::process::{Process, run_to_exit, spawn, work_dir};
use crate::support::*;

/// Waits until the process's log has a line containing every needle; returns that line.
fn wait_for_process_log(process: &Process, needles: &[&str]) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let log = process.log_text();
        if let Some(line) = log.lines().find(|line| needles.iter().all(|n| line.contains(n))) {
            return line.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no log line with {needles:?} in:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Secrets that a typo puts into a config file, each in a different way.
const TYPO_SECRET: &str = "SUPERSECRET-typo-5f2a9c";
const UNQUOTED_SECRET: &str = "sk-live-unquoted-81d3e0";
const WRONG_TYPE_SECRET: &str = "sk-live-SECRET-wrongtype-c47";
const RELOAD_SECRET: &str = "sk-live-reload-0b6e1d";
const CONFIG_SECRET: &str = "sk-live-config-7e5a42";

fn assert_no_secret(output: &str) {
    for secret in [TYPO_SECRET, UNQUOTED_SECRET, WRONG_TYPE_SECRET, RELOAD_SECRET, CONFIG_SECRET] {
        // Not even a part of one: the test secrets share no prefix longer than "sk-live-".
        assert!(!output.contains(secret), "{secret} was printed:\n{output}");
        assert!(!output.contains(&secret[secret.len() - 6..]), "part of {secret} was printed:\n{output}");
    }
}

/// A manifest with a secret under a misspelt key, one with a secret left unquoted
/// (invalid TOML), and one with a secret under a numeric key: at start-up, on hot reload
/// and in `sockhost check`, the error names the file, line, column and key, never the
/// value. The same for `sockhost.toml`, at start-up and on SIGHUP.
#[tokio::test]
async fn a_typo_in_a_manifest_or_the_config_names_where_it_is_but_never_prints_the_value() {
    let echo = bundled_addon("echo");
    let typo = format!("kv = true\n[auth]\njwt_hs256_secert = \"{TYPO_SECRET}\"\n");
    let unquoted = format!("[config]\nmodel = \"m\"\napi_key = {UNQUOTED_SECRET}\n");
    let wrong_type = format!("cpu_limit_ms = \"{WRONG_TYPE_SECRET}\"\n");
    let work = work_dir(&[
        ("addons/typo.wasm", &echo),
        ("addons/typo.toml", typo.as_bytes()),
        ("addons/unquoted.wasm", &echo),
        ("addons/unquoted.toml", unquoted.as_bytes()),
        ("addons/wrongtype.wasm", &echo),
        ("addons/wrongtype.toml", wrong_type.as_bytes()),
        ("addons/good.wasm", &echo),
        ("sockhost.toml", b"[server]\nreload_poll_ms = 50\n"),
    ]);
    let expected = [
        (
            "addons/typo.toml",
            "line 3, column 1, key `auth.jwt_hs256_secert`: unknown field `jwt_hs256_secert`",
        ),
        ("addons/unquoted.toml", "line 3, column 11, key `config.api_key`: "),
        (
            "addons/wrongtype.toml",
            "line 1, column 16, key `cpu_limit_ms`: invalid type: string \"…\", expected u64",
        ),
    ];

    // Start-up.
    let process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    for (file, problem) in expected {
        let line = wait_for_process_log(&process, &["addon not mounted", file]);
        assert!(line.contains(problem), "{line}");
    }

    // Hot reload of a manifest.
    std::fs::write(
        work.path().join("addons/good.toml"),
        format!("max_connections = 5\nsecret = {RELOAD_SECRET}\n"),
    )
    .unwrap();
    let line = wait_for_process_log(&process, &["addon not reloaded", "addons/good.toml"]);
    assert!(line.contains("line 2, column 10, key `secret`"), "{line}");

    // SIGHUP with a config file that holds a secret under a wrong key.
    std::fs::write(work.path().join("sockhost.toml"), format!("[admin]\napi_key = \"{CONFIG_SECRET}\"\n"))
        .unwrap();
    process.signal("-HUP");
    let line = wait_for_process_log(&process, &["configuration not reloaded"]);
    assert!(
        line.contains("sockhost.toml: line 2, column 1, key `admin.api_key`: unknown field `api_key`"),
        "{line}"
    );
    let log = process.log_text();
    drop(process);
    assert_no_secret(&log);

    // `sockhost check`.
    let (code, output) = run_to_exit(work.path(), &["check", "addons"], &[]);
    assert_ne!(code, 0, "{output}");
    for (file, problem) in expected {
        let line =
            output.lines().find(|line| line.contains(file)).unwrap_or_else(|| panic!("{file}: {output}"));
        assert!(line.contains(problem), "{line}");
    }
    assert_no_secret(&output);

    // Start-up with a bad config file: unquoted (invalid TOML) and a wrong type.
    for (text, problem) in [
        (
            format!("[cluster]\nredis_url = redis://:{CONFIG_SECRET}@cache:6379\n"),
            "sockhost.toml: line 2, column 13, key `cluster.redis_url`: ",
        ),
        (
            format!("[server]\nport = \"{CONFIG_SECRET}\"\n"),
            "sockhost.toml: line 2, column 8, key `server.port`: ",
        ),
        (
            format!("[log]\nformat = \"{CONFIG_SECRET}\"\n"),
            "sockhost.toml: line 2, column 10, key `log.format`: ",
        ),
    ] {
        std::fs::write(work.path().join("sockhost.toml"), &text).unwrap();
        let (code, output) = run_to_exit(work.path(), &[], &[]);
        assert_ne!(code, 0, "{output}");
        assert!(output.contains(problem), "{text}: {output}");
        assert_no_secret(&output);
    }
}
