//! `sockhost check <file.wasm|dir>...`: validates addons the way the server would load
//! them, without serving, for deploy pipelines.
//!
//! Each file goes through the same [`Loader`] as start-up and hot reload (name, component
//! header, manifest, compile, link against the host's imports, the `addon` world's
//! exports), with the same engine settings, so "check passes" means "the server mounts
//! it". For each addon it prints the URL path, the version, what the component imports,
//! and its policy: every grant and limit, defaults included ([`AddonPolicy::describe`]).
//! Then the capacity arithmetic of the server's settings (the config file and
//! environment as `sockhost` would read them): what the instance pool reserves and maps
//! against what this machine allows ([`crate::capacity`]), the same lines start-up logs.
//! The exit code is non-zero when any file fails, none was found, or the pool would not
//! fit this machine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::addons::{self, Loader};
use crate::capacity::{Machine, Plan};
use crate::config::ServerLimits;
use crate::error::FailureCounts;
use crate::metrics::Metrics;
use crate::policy::AddonPolicy;

/// Checks every addon in `paths` (files, or directories whose `*.wasm` are checked) and
/// writes the report to `out`. `limits` are the server's (they decide the pool the addons must fit), or why its
/// settings could not be read: then the defaults are used and the check fails.
pub fn run(paths: &[PathBuf], limits: anyhow::Result<ServerLimits>, out: &mut impl Write) -> ExitCode {
    let (limits, settings_ok) = match limits {
        Ok(limits) => (limits, true),
        Err(err) => {
            let _ = writeln!(out, "FAIL  the server's settings: {err:#}; the default limits are used below");
            (ServerLimits::default(), false)
        }
    };
    match check(paths, &limits, out) {
        Ok(true) if settings_ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            let _ = writeln!(out, "error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(paths: &[PathBuf], limits: &ServerLimits, out: &mut impl Write) -> anyhow::Result<bool> {
    let mut files = Vec::new();
    let mut problems = 0usize;
    for path in paths {
        if path.is_dir() {
            let found = addons::wasm_files(path)?;
            if found.is_empty() {
                writeln!(out, "FAIL  {}: no *.wasm addons in this directory", path.display())?;
                problems += 1;
            }
            files.extend(found);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            writeln!(out, "FAIL  {}: no such file or directory", path.display())?;
            problems += 1;
        }
    }

    // The server's pool, with the reservation derived from the addons checked when it is
    // not set; the engine gets the same settings but few slots: only the settings that
    // change compiled code matter for compiling.
    let plan = Plan::new(limits, files.iter().map(PathBuf::as_path));
    let engine = crate::engine::build(&Plan { slots: 4, ..plan })?;
    let linkers = crate::host::linker(&engine).map_err(anyhow::Error::from)?;
    let metrics = Arc::new(Metrics::new(Arc::new(FailureCounts::default())));
    let loader = Loader::new(engine, plan.memory_reservation, linkers, None, metrics);

    let mut ok = 0usize;
    for file in &files {
        match loader.load_file(file) {
            Ok(addon) => {
                ok += 1;
                writeln!(
                    out,
                    "ok    {} → /ws/{} (version {})",
                    file.display(),
                    addon.name(),
                    addon.version()
                )?;
                writeln!(out, "      imports: {}", addon.imports().join(", "))?;
                let mut exports = vec!["handler"];
                exports.push(if addon.receives_channel_messages() {
                    "channel-handler"
                } else {
                    "no channel-handler (it cannot subscribe to channels)"
                });
                let hibernation = match addon.hibernate_after() {
                    Some(after) => {
                        format!("hibernation (idle connections hibernate after {} ms)", after.as_millis())
                    }
                    None if addon.exports_hibernation() => {
                        "hibernation (off: hibernate_after_ms = 0)".to_owned()
                    }
                    None => "no hibernation (its idle connections keep their instance)".to_owned(),
                };
                writeln!(out, "      exports: {}, {hibernation}", exports.join(", "))?;
                writeln!(out, "      manifest: {}", manifest_note(file))?;
                write_policy(out, addon.policy())?;
            }
            Err(err) => {
                problems += 1;
                writeln!(out, "FAIL  {}: {err}", file.display())?;
            }
        }
    }
    writeln!(out, "{} checked: {ok} ok, {problems} failed", files.len())?;

    let assessment = plan.assess(&Machine::read());
    writeln!(out, "capacity (the server's limits on this machine):")?;
    for line in &assessment.lines {
        writeln!(out, "      {line}")?;
    }
    for warning in &assessment.warnings {
        writeln!(out, "WARN  {warning}")?;
    }
    for problem in &assessment.problems {
        writeln!(out, "FAIL  start-up would be refused: {problem}")?;
    }
    Ok(problems == 0 && ok > 0 && assessment.problems.is_empty())
}

fn manifest_note(wasm: &Path) -> String {
    let manifest = wasm.with_extension("toml");
    if manifest.exists() { manifest.display().to_string() } else { "none (the defaults apply)".to_owned() }
}

fn write_policy(out: &mut impl Write, policy: &AddonPolicy) -> std::io::Result<()> {
    writeln!(out, "      always: session, log; WASI with no files, environment, arguments or network")?;
    let grants = policy.grants();
    if grants.is_empty() {
        writeln!(out, "      grants: none (no kv, config, auth, outbound HTTP or channels)")?;
    }
    for grant in grants {
        writeln!(out, "      grant: {grant}")?;
    }
    for (key, value) in policy.describe() {
        writeln!(out, "      {key:<20} {value}")?;
    }
    Ok(())
}
