//! `clients/js` as the npm package `@fanout/client`, checked by npm's own tools: `npm pack`
//! makes a tarball with exactly the module, its declarations, the README and package.json;
//! installed from that tarball, `import "@fanout/client"` resolves through `exports` in
//! Node; `tsc` (npm's typescript, in `.tools/npm`; `make test` installs it) type-checks the
//! typed usage example against the declarations, `@ts-expect-error` lines included. The unit
//! tests run under `node --test` in make test; the API serves the same file at `/fanout.js`.

mod common;

use std::{collections::BTreeSet, process::Command};

use common::{succeeds, workspace};

/// `command`'s stdout; panics with its output unless it succeeds.
fn run(command: &mut Command) -> String {
    succeeds(command).0
}
use serde_json::Value;

#[test]
fn npm_pack_makes_the_package_and_it_imports_by_name() {
    let package = workspace().join("clients/js");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(package.join("package.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["name"], "@fanout/client");
    assert_eq!(manifest["type"], "module");
    assert_eq!(manifest["exports"]["."]["types"], "./fanout.d.ts");
    assert_eq!(manifest["exports"]["."]["default"], "./fanout.js");

    let out = tempfile::tempdir().unwrap();
    let packed = run(Command::new("npm")
        .args(["pack", "--json", "--pack-destination"])
        .arg(out.path())
        .current_dir(&package)
        .env("npm_config_update_notifier", "false"));
    let report: Value = serde_json::from_str(&packed).unwrap();
    let tarball = out.path().join(report[0]["filename"].as_str().unwrap());
    assert!(tarball.exists(), "{packed}");
    let listed = run(Command::new("tar").arg("-tzf").arg(&tarball));
    let files: BTreeSet<&str> = listed.lines().collect();
    let expected: BTreeSet<&str> = [
        "package/package.json",
        "package/fanout.js",
        "package/fanout.d.ts",
        "package/README.md",
    ]
    .into();
    assert_eq!(files, expected, "the tarball holds the wrong files");

    // Installed from the tarball (no registry: it has no dependencies), it imports by name
    // through `exports` and has every export the declarations promise.
    let app = tempfile::tempdir().unwrap();
    std::fs::write(
        app.path().join("package.json"),
        r#"{"name":"app","private":true}"#,
    )
    .unwrap();
    run(Command::new("npm")
        .args(["install", "--offline", "--no-audit", "--no-fund"])
        .arg(&tarball)
        .current_dir(app.path())
        .env("npm_config_update_notifier", "false"));
    let exports = run(Command::new("node")
        .args([
            "--input-type=module",
            "-e",
            "const m = await import('@fanout/client'); console.log(Object.keys(m).sort().join(','))",
        ])
        .current_dir(app.path()));
    let declarations = std::fs::read_to_string(package.join("fanout.d.ts")).unwrap();
    for name in exports.trim().split(',') {
        assert!(
            declarations.contains(&format!("export declare const {name}"))
                || declarations.contains(&format!("export declare function {name}"))
                || declarations.contains(&format!("export declare class {name}")),
            "{name} is exported but not declared in fanout.d.ts"
        );
    }
    assert!(exports.contains("FanoutClient"), "{exports}");
}

#[test]
fn the_typed_usage_example_type_checks() {
    let tsc = workspace().join(".tools/npm/node_modules/.bin/tsc");
    assert!(
        tsc.exists(),
        "{} is missing: `make test` installs typescript from npm",
        tsc.display()
    );
    run(Command::new(tsc)
        .args(["-p", "clients/js/tsconfig.json"])
        .current_dir(workspace()));
}
