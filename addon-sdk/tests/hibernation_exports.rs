//! Which built components export `sockhost:addon/hibernation`: exactly those whose crate
//! says `export_addon!(T, hibernate)`. The host hibernates only components with the export,
//! so a plain `export_addon!(T)` that exported it would put addons that never opted in
//! (and the tests' addons that must stay live) at risk.
//!
//! Reads the committed `addons/*.wasm`, and the test addons that `scripts/build-addons`
//! puts in `$CARGO_TARGET_DIR/test-addons` when they are there (CI builds them first).

use std::path::{Path, PathBuf};

use wasmparser::{Parser, Payload};

// Any 0.1.x: a committed component built against an earlier minor version (one whose
// language was not rebuilt) exports the same interfaces under its version.
const HIBERNATION: &str = "sockhost:addon/hibernation@0.1.";
const HANDLER: &str = "sockhost:addon/handler@0.1.";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The names the component exports at its top level (not those of its inner modules).
fn component_exports(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    let mut depth = 0usize;
    let mut names = Vec::new();
    for payload in Parser::new(0).parse_all(&bytes) {
        match payload.unwrap_or_else(|err| panic!("{} is not a component: {err}", path.display())) {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentExportSection(exports) if depth == 0 => {
                for export in exports {
                    names.push(export.unwrap().name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    names
}

/// Whether the addon of a built component opts in, from its source: in Rust
/// `export_addon!(T, hibernate)`; in JavaScript and Python, the world `hibernating` in
/// `package.json` or `pyproject.toml` (scripts/build-addons builds with the world they name,
/// and the build fails when the module lacks the export the world has).
fn opts_in(addon_dir: &Path) -> bool {
    let read = |file: &str| std::fs::read_to_string(addon_dir.join(file));
    if let Ok(source) = read("src/lib.rs") {
        return source.contains("hibernate);");
    }
    if let Ok(package) = read("package.json") {
        return package.contains(r#""world": "hibernating""#);
    }
    let pyproject = read("pyproject.toml").unwrap_or_else(|err| panic!("{}: {err}", addon_dir.display()));
    pyproject.contains(r#"world = "hibernating""#)
}

fn check(crate_dir: &Path, wasm: &Path) {
    let exports = component_exports(wasm);
    assert!(
        exports.iter().any(|e| e.starts_with(HANDLER)),
        "{} exports no handler: {exports:?}",
        wasm.display()
    );
    let hibernates = exports.iter().any(|e| e.starts_with(HIBERNATION));
    assert_eq!(
        hibernates,
        opts_in(crate_dir),
        "{} exports hibernation: {hibernates}, but its source opts in: {}; exports: {exports:?}",
        wasm.display(),
        !hibernates
    );
}

#[test]
fn bundled_addons_export_hibernation_when_they_opt_in() {
    let root = repo_root();
    for name in ["echo", "chatroom", "aikefu", "echo-js", "echo-py"] {
        assert!(opts_in(&root.join("addons").join(name)), "{name} is expected to opt in");
    }
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("addons")).unwrap() {
        let wasm = entry.unwrap().path();
        if wasm.extension().is_some_and(|e| e == "wasm") {
            check(&wasm.with_extension(""), &wasm);
            checked += 1;
        }
    }
    assert!(checked >= 5, "found {checked} bundled addons");
}

#[test]
fn test_addons_export_hibernation_only_when_they_opt_in() {
    let root = repo_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let built = target.join("test-addons");
    if !built.join("mirror.wasm").exists() {
        eprintln!("skipped: no test addons in {}; run scripts/build-addons", built.display());
        return;
    }
    for (name, expected) in
        [("testkit", true), ("mirror", false), ("streamer", false), ("nohandler", false), ("fanout", false)]
    {
        let crate_dir = root.join("tests/addons").join(name);
        assert_eq!(opts_in(&crate_dir), expected, "{name}");
        check(&crate_dir, &built.join(format!("{name}.wasm")));
    }
    // The JavaScript and Python test addons, when their languages' tools were there.
    for name in ["testkit-js", "testkit-py"] {
        let wasm = built.join(format!("{name}.wasm"));
        if !wasm.exists() {
            eprintln!("skipped: {} is not built", wasm.display());
            continue;
        }
        let addon_dir = root.join("tests/addons").join(name);
        assert!(opts_in(&addon_dir), "{name} is expected to opt in");
        check(&addon_dir, &wasm);
    }
}
