//! The repository stands alone: nothing in it refers to a path outside it, so a
//! fresh clone builds and tests with what it holds; and what it ships (the image) is
//! built the way Cargo.toml says.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Strings that name a place outside the repository wherever they appear. Built at run
/// time so that this file, which is scanned like every other, does not contain them.
fn outside_markers() -> Vec<String> {
    vec![["..", "shared"].join("/"), ["", "work", ""].join("/"), ["", "home", ""].join("/")]
}

/// References in `text`, the content of the file at `path` (relative to the repository
/// root, `/`-separated), to a place outside the repository: a marker above, or a
/// relative path whose leading `../` climb above the root from the file's folder.
fn outside_refs(path: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for m in outside_markers() {
            if line.contains(&m) {
                found.push(format!("{path}:{}: `{m}`: {}", n + 1, line.trim()));
            }
        }
        let depth = path.matches('/').count();
        let bytes = line.as_bytes();
        let mut i = 0;
        while let Some(off) = line[i..].find("../") {
            let start = i + off;
            // Only a path that starts here: `a/../b` stays where it was.
            let starts_path =
                start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || b"/._-".contains(&bytes[start - 1]));
            let mut ups = 0;
            let mut j = start;
            while line[j..].starts_with("../") {
                ups += 1;
                j += 3;
            }
            if starts_path && ups > depth {
                found.push(format!(
                    "{path}:{}: `{}` climbs above the repository: {}",
                    n + 1,
                    &line[start..j],
                    line.trim()
                ));
            }
            i = j;
        }
    }
    found
}

/// Every file git tracks or would track (untracked files not ignored), relative to the root.
fn repository_files() -> Vec<String> {
    let out = Command::new("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(root())
        .output()
        .expect("git must be installed to list the repository's files");
    assert!(out.status.success(), "git ls-files: {}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<String> =
        String::from_utf8(out.stdout).unwrap().split('\0').filter(|f| !f.is_empty()).map(str::to_owned).collect();
    assert!(files.len() > 50, "git ls-files listed only {files:?}");
    files
}

#[test]
fn nothing_in_the_repository_refers_to_a_path_outside_it() {
    let root = root();
    let mut found = Vec::new();
    let mut scanned = 0;
    for f in repository_files() {
        let p = root.join(&f);
        if let Ok(target) = std::fs::read_link(&p) {
            let resolved = p.parent().unwrap().join(&target);
            let inside = resolved.canonicalize().is_ok_and(|r| r.starts_with(root.canonicalize().unwrap()));
            if !inside {
                found.push(format!("{f}: symbolic link to {}", target.display()));
            }
            continue;
        }
        // Deleted in the working tree, or not text (images, fuzz seeds): nothing to read.
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        scanned += 1;
        found.extend(outside_refs(&f, &text));
    }
    assert!(scanned > 50, "only {scanned} text files scanned");
    assert!(found.is_empty(), "references to paths outside the repository:\n{}", found.join("\n"));
}

#[test]
fn the_scanner_finds_what_it_looks_for() {
    let up = ["..", ""].join("/");
    let shared = format!("{up}shared");
    // The two forms issue 11 found: a doc link and a path joined onto the root.
    assert_eq!(outside_refs("ARCHITECTURE.md", &format!("See `{shared}/ARCHITECTURE.md` for")).len(), 2);
    assert_eq!(outside_refs("tests/tests/k8s.rs", &format!("root().join(\"{shared}/crd-schemas\")")).len(), 1);
    assert_eq!(outside_refs("tests/k8s/validate.py", &format!("open(\"{}\")", ["", "work", "x"].join("/"))).len(), 1);
    // Climbing above the root from the file's folder, however the path is quoted.
    assert_eq!(outside_refs("gateway/Cargo.toml", &format!("x = {{ path = \"{up}{up}other\" }}")).len(), 1);
    assert_eq!(outside_refs("k8s/overlays/dev/kustomization.yaml", &format!("  - {up}{up}{up}{up}x")).len(), 1);
    // Inside the repository: fine.
    assert!(
        outside_refs("k8s/overlays/dev/kustomization.yaml", &format!("  - {up}{up}{up}x")).is_empty(),
        "the root itself"
    );
    assert!(outside_refs("k8s/overlays/dev/kustomization.yaml", &format!("  - {up}{up}base")).is_empty());
    assert!(outside_refs("gateway/src/metrics.rs", &format!("include_str!(\"{up}{up}docs/metrics.md\")")).is_empty());
    assert!(outside_refs("gateway/Cargo.toml", &format!("path = \"{up}tests\"")).is_empty());
    assert!(outside_refs("a/b/c.txt", &format!("x/{up}{up}{up}{up}y")).is_empty(), "mid-path `..` is not a climb");
}

/// `key = value` lines of the `[section]` of a TOML file (flat sections only).
fn toml_section(text: &str, section: &str) -> Vec<(String, String)> {
    let header = format!("[{section}]");
    text.lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter_map(|l| l.split('#').next()?.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The image ships stripped binaries. A static check (no container engine on the test
/// machines): the Dockerfile builds with the `dist` profile and copies that profile's
/// output, and the profile strips symbols and generates no debug info.
#[test]
fn the_image_ships_binaries_of_the_stripped_dist_profile() {
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let dist = toml_section(&cargo, "profile.dist");
    let get = |k: &str| dist.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(get("inherits"), Some("\"release\""), "[profile.dist] must inherit release: {dist:?}");
    assert_eq!(get("strip"), Some("\"symbols\""), "[profile.dist] must strip symbols: {dist:?}");
    assert!(matches!(get("debug"), Some("0" | "false" | "\"none\"")), "[profile.dist] must set debug = 0: {dist:?}");

    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let builds: Vec<&str> = docker.lines().filter(|l| l.contains("cargo build")).collect();
    assert!(!builds.is_empty(), "the Dockerfile builds nothing with cargo");
    for b in &builds {
        assert!(b.contains("--profile dist") && !b.contains("--release"), "not the dist profile: {b}");
    }
    for bin in ["gateway", "presence", "broker-bridge"] {
        assert!(docker.contains(&format!("target/dist/{bin}")), "the image does not take {bin} from target/dist");
    }
    assert!(!docker.contains("target/release/"), "the image copies an unstripped release binary");
}

#[test]
fn toml_sections_are_read_as_written() {
    let text = "[a]\nx = 1 # one\n[profile.dist]\ninherits = \"release\"\nstrip = \"symbols\"\n\n[b]\ny = 2\n";
    let s = toml_section(text, "profile.dist");
    assert_eq!(s, vec![("inherits".into(), "\"release\"".into()), ("strip".into(), "\"symbols\"".into())]);
    assert!(toml_section(text, "profile.missing").is_empty());
}
