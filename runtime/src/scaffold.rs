//! `sockhost new NAME [--lang rust|js|python]`: a working addon to start from.
//!
//! Writes `<addons_dir>/NAME/` from templates compiled into the binary (`runtime/templates/`):
//! an addon that echoes text and streams a chat reply word by word, its logic apart in a
//! function with a unit test in the language's own runner (`cargo test`, `npm test`,
//! `python3 -m unittest`), and `<addons_dir>/NAME.toml`, a manifest that grants nothing.
//! `scripts/build-addons <addons_dir>/NAME` builds it into `<addons_dir>/NAME.wasm`, where
//! the server mounts it.
//!
//! The addon depends on sockhost's SDK for its language (`addon-sdk/`, `addon-sdk/js`,
//! `addon-sdk/python`): by a relative path when the SDK is found in the current directory
//! (in a checkout of sockhost, the usual case), otherwise by the path given with `--sdk`.
//! Rust: a path dependency, and the crate has its own `[workspace]`, so it builds the same
//! inside the repository and outside. JavaScript: a `file:` dependency that npm links.
//! Python: nothing to write, the build puts the SDK on the module path.
//!
//! Nothing is written unless everything can be: a bad name, an existing directory or
//! manifest, or a missing SDK is refused first, with a message that says what to do.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::addons::is_valid_name;

/// The language of a new addon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with `addon-sdk` (a crate)
    Rust,
    /// JavaScript, with `addon-sdk/js`, built with componentize-js
    Js,
    /// Python, with `addon-sdk/python`, built with componentize-py
    Python,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::Rust => "rust",
            Lang::Js => "js",
            Lang::Python => "python",
        })
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewAddon {
    pub name: String,
    pub lang: Lang,
    /// The server's addons directory: the addon goes into `<addons_dir>/<name>/`.
    pub addons_dir: PathBuf,
    /// sockhost's `addon-sdk/` directory (the Rust SDK; `js/` and `python/` inside it).
    pub sdk: PathBuf,
}

/// Why nothing was created.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "invalid addon name {0:?}: use lowercase letters, digits, '-' and '_' (the name becomes the URL path /ws/<name>)"
    )]
    InvalidName(String),
    #[error("{0} already exists: choose another name, or remove it first")]
    Exists(PathBuf),
    #[error(
        "sockhost's addon SDK is not at {0}: run `sockhost new` from a checkout of sockhost, or pass --sdk <path to addon-sdk>"
    )]
    NoSdk(PathBuf),
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What was created, and what to do next.
#[derive(Debug)]
pub struct Created {
    pub dir: PathBuf,
    pub manifest: PathBuf,
    /// Build, run, connect: one command each.
    pub next: [String; 3],
}

const MANIFEST: &str = include_str!("../templates/manifest.toml");
const RUST: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
    ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
];
const JS: &[(&str, &str)] = &[
    ("package.json", include_str!("../templates/js/package.json")),
    ("src/index.js", include_str!("../templates/js/src/index.js")),
    ("src/reply.js", include_str!("../templates/js/src/reply.js")),
    ("test/reply.test.js", include_str!("../templates/js/test/reply.test.js")),
];
const PYTHON: &[(&str, &str)] = &[
    ("pyproject.toml", include_str!("../templates/python/pyproject.toml")),
    ("app.py", include_str!("../templates/python/app.py")),
    ("reply.py", include_str!("../templates/python/reply.py")),
    ("test_reply.py", include_str!("../templates/python/test_reply.py")),
];

/// Creates the addon. Checks everything before writing anything.
pub fn create(new: &NewAddon) -> Result<Created, ScaffoldError> {
    if !is_valid_name(&new.name) {
        return Err(ScaffoldError::InvalidName(new.name.clone()));
    }
    let dir = new.addons_dir.join(&new.name);
    let manifest = new.addons_dir.join(format!("{}.toml", new.name));
    for path in [&dir, &manifest] {
        // `exists` follows links; a dangling link is in the way too.
        if path.symlink_metadata().is_ok() {
            return Err(ScaffoldError::Exists(path.clone()));
        }
    }
    let sdk = match new.lang {
        Lang::Rust => new.sdk.clone(),
        Lang::Js => new.sdk.join("js"),
        Lang::Python => new.sdk.join("python"),
    };
    let marker = match new.lang {
        Lang::Rust => "Cargo.toml",
        Lang::Js => "package.json",
        Lang::Python => "sockhost_addon/__init__.py",
    };
    if !sdk.join(marker).is_file() {
        return Err(ScaffoldError::NoSdk(sdk));
    }
    // The dependency is written relative to the addon's directory when both are relative
    // (a checkout: addons/NAME and addon-sdk), so the checkout can move; otherwise absolute.
    let sdk_ref = relative_to(&dir, &sdk);
    let (files, key) = match new.lang {
        Lang::Rust => (RUST, "{{rust_sdk}}"),
        Lang::Js => (JS, "{{js_sdk}}"),
        Lang::Python => (PYTHON, "{{python_sdk}}"),
    };
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ScaffoldError::Io { path, source }
    };
    for (file, template) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).map_err(io(&path))?;
        let text = template.replace("{{name}}", &new.name).replace(key, &sdk_ref);
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    std::fs::write(&manifest, MANIFEST.replace("{{name}}", &new.name)).map_err(io(&manifest))?;

    let run = if new.addons_dir == Path::new("addons") {
        "cargo run --release -p sockhost".to_owned()
    } else {
        format!("cargo run --release -p sockhost -- --addons-dir {}", new.addons_dir.display())
    };
    let next = [
        format!("scripts/build-addons {}", dir.display()),
        run,
        format!(
            "node --experimental-websocket -e \"const ws = new WebSocket('ws://localhost:8080/ws/{}'); \
             ws.onmessage = (e) => console.log(e.data); ws.onopen = () => ws.send(JSON.stringify({{message: 'hello there'}}))\"",
            new.name
        ),
    ];
    Ok(Created { dir, manifest, next })
}

/// `to` as seen from `from`, when both are relative paths of plain names; else `to` made
/// absolute.
fn relative_to(from: &Path, to: &Path) -> String {
    use std::path::Component;
    let plain = |p: &Path| p.is_relative() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if plain(from) && plain(to) {
        let from: Vec<_> = from.components().collect();
        let to: Vec<_> = to.components().collect();
        let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
        let mut path = PathBuf::new();
        for _ in common..from.len() {
            path.push("..");
        }
        for part in &to[common..] {
            path.push(part);
        }
        return path.display().to_string();
    }
    std::path::absolute(to).unwrap_or_else(|_| to.to_owned()).display().to_string()
}

/// What `sockhost new` prints.
pub fn describe(new: &NewAddon, created: &Created) -> String {
    format!(
        "Created the {lang} addon `{name}` in {dir}/ with its manifest {manifest} (nothing granted).\n\
         Next:\n  {build}        # build it into {name}.wasm\n  {run}        # serve it at ws://localhost:8080/ws/{name}\n  {connect}\n",
        lang = new.lang,
        name = new.name,
        dir = created.dir.display(),
        manifest = created.manifest.display(),
        build = created.next[0],
        run = created.next[1],
        connect = created.next[2],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_in(dir: &Path, name: &str, lang: Lang) -> NewAddon {
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("addon-sdk");
        NewAddon { name: name.to_owned(), lang, addons_dir: dir.to_owned(), sdk }
    }

    #[test]
    fn bad_names_existing_paths_and_a_missing_sdk_are_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["", "Hello", "a/b", "..", "hi there", "ünï"] {
            let err = create(&new_in(tmp.path(), name, Lang::Js)).unwrap_err();
            assert!(matches!(err, ScaffoldError::InvalidName(_)), "{name:?}: {err}");
            assert!(err.to_string().contains("lowercase letters"), "{err}");
        }
        std::fs::create_dir(tmp.path().join("taken")).unwrap();
        let err = create(&new_in(tmp.path(), "taken", Lang::Rust)).unwrap_err();
        assert!(
            matches!(err, ScaffoldError::Exists(_)) && err.to_string().contains("already exists"),
            "{err}"
        );
        std::fs::write(tmp.path().join("manifested.toml"), "").unwrap();
        let err = create(&new_in(tmp.path(), "manifested", Lang::Python)).unwrap_err();
        assert!(matches!(err, ScaffoldError::Exists(_)), "{err}");
        let mut no_sdk = new_in(tmp.path(), "lonely", Lang::Python);
        no_sdk.sdk = tmp.path().join("nowhere");
        let err = create(&no_sdk).unwrap_err();
        assert!(err.to_string().contains("--sdk"), "{err}");
        let mut left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["manifested.toml", "taken"], "nothing else was written");
    }

    #[test]
    fn every_language_gets_its_files_a_manifest_that_grants_nothing_and_three_next_commands() {
        for (lang, entry) in
            [(Lang::Rust, "src/lib.rs"), (Lang::Js, "src/index.js"), (Lang::Python, "app.py")]
        {
            let tmp = tempfile::tempdir().unwrap();
            let new = new_in(tmp.path(), "hello-1", lang);
            let created = create(&new).unwrap();
            assert!(created.dir.join(entry).is_file(), "{lang}");
            let manifest = std::fs::read_to_string(&created.manifest).unwrap();
            let policy = crate::policy::AddonPolicy::parse(&manifest).expect("the manifest is valid");
            assert_eq!(policy, crate::policy::AddonPolicy::default(), "{lang}: only defaults");
            assert!(created.next[0].starts_with("scripts/build-addons "), "{:?}", created.next);
            assert!(created.next[2].contains("/ws/hello-1"), "{:?}", created.next);
            let text = describe(&new, &created);
            assert!(text.contains("hello-1") && text.contains(&created.next[1]), "{text}");
            // No placeholder is left in any file.
            for file in walk(&created.dir) {
                let text = std::fs::read_to_string(&file).unwrap();
                assert!(!text.contains("{{"), "{}: {text}", file.display());
            }
        }
    }

    #[test]
    fn the_sdk_is_referenced_relatively_inside_a_checkout() {
        assert_eq!(relative_to(Path::new("addons/hello"), Path::new("addon-sdk/js")), "../../addon-sdk/js");
        assert_eq!(relative_to(Path::new("addons/hello"), Path::new("addon-sdk")), "../../addon-sdk");
        assert_eq!(relative_to(Path::new("/x/addons/hello"), Path::new("/y/addon-sdk")), "/y/addon-sdk");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
        }
        files
    }
}
