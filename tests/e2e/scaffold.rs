//! `sockhost new`, run as a user would: the real binary writes an addon in each language
//! into a fresh directory, `scripts/build-addons` builds it (the same build path as the
//! bundled addons), a server mounts it, and a WebSocket client talks to it. Bad input is
//! refused with a message that says what is wrong, and leaves nothing behind.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sockhost");

fn sockhost_new(args: &[&str], addons: &Path) -> Output {
    let sdk = repo_root().join("addon-sdk");
    Command::new(BIN)
        .arg("new")
        .args(args)
        .arg("--dir")
        .arg(addons)
        .arg("--sdk")
        .arg(&sdk)
        .output()
        .expect("sockhost runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn new_refuses_a_bad_name_an_existing_addon_and_an_unknown_language() {
    let tmp = tempfile::tempdir().unwrap();
    let addons = tmp.path().join("addons");
    std::fs::create_dir(&addons).unwrap();

    for bad in ["Hello", "../escape", "two words", "ünï"] {
        let out = sockhost_new(&[bad], &addons);
        assert!(!out.status.success(), "{bad}");
        let err = text(&out.stderr);
        assert!(err.contains("invalid addon name") && err.contains("lowercase letters"), "{bad}: {err}");
    }

    let out = sockhost_new(&["taken", "--lang", "js"], &addons);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sockhost_new(&["taken", "--lang", "python"], &addons);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("already exists"), "{}", text(&out.stderr));

    let out = sockhost_new(&["other", "--lang", "cobol"], &addons);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("invalid value 'cobol'") && err.contains("rust, js, python"), "{err}");

    let out = Command::new(BIN)
        .args(["new", "lonely", "--dir"])
        .arg(&addons)
        .arg("--sdk")
        .arg(tmp.path().join("no-sdk-here"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--sdk"), "{}", text(&out.stderr));

    let mut left: Vec<String> =
        std::fs::read_dir(&addons).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["taken", "taken.toml"], "refusals write nothing");
}

#[tokio::test]
async fn new_addons_in_every_language_build_mount_and_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let addons = tmp.path().join("addons");
    std::fs::create_dir(&addons).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for lang in ["rust", "js", "python"] {
        let name = format!("hello-{lang}");
        let out = sockhost_new(&[&name, "--lang", lang], &addons);
        assert!(out.status.success(), "{lang}: {}", text(&out.stderr));
        let printed = text(&out.stdout);
        let dir = addons.join(&name);
        // Build, run, connect: the three next commands, the first one runnable as printed.
        assert!(printed.contains(&format!("scripts/build-addons {}", dir.display())), "{printed}");
        assert!(printed.contains("cargo run --release -p sockhost"), "{printed}");
        assert!(printed.contains(&format!("ws://localhost:8080/ws/{name}")), "{printed}");

        let build = Command::new(repo_root().join("scripts/build-addons")).arg(&dir).output().unwrap();
        assert!(
            build.status.success(),
            "{lang}: build failed:\n{}\n{}",
            text(&build.stdout),
            text(&build.stderr)
        );
        assert!(!text(&build.stderr).contains("SKIPPED"), "{lang}: {}", text(&build.stderr));
        let wasm = std::fs::read(addons.join(format!("{name}.wasm"))).expect("built next to its directory");
        files.push((format!("{name}.wasm"), wasm));
        let manifest = std::fs::read(addons.join(format!("{name}.toml"))).unwrap();
        files.push((format!("{name}.toml"), manifest));
    }
    let mounted: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    let server = TestServer::start(&mounted).await;
    for lang in ["rust", "js", "python"] {
        let mut client = server.connect(&format!("/ws/hello-{lang}")).await;
        client.send_text("plain").await;
        assert_eq!(client.recv_text().await, "plain", "{lang}");
        client.send_text(r#"{"message":"where is my order","session_id":"s9"}"#).await;
        let mut words = Vec::new();
        loop {
            let chunk = client.recv_json().await;
            assert_eq!(chunk["session_id"], "s9", "{lang}: {chunk}");
            words.push(chunk["message"].as_str().unwrap().to_owned());
            if chunk["complete"] == true {
                break;
            }
        }
        assert_eq!(words.concat(), "You said: where is my order", "{lang}");
        assert_eq!(words.len(), 7, "{lang}: six words, then the complete chunk: {words:?}");
        client.send_text(r#"{"session_id":"s9"}"#).await;
        assert_eq!(client.recv_json().await["code"], "missing_field", "{lang}");
    }
}
