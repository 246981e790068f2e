//! Records the git commit and target triple for `mqic version`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MQIC_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=MQIC_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    println!("cargo:rerun-if-changed=build.rs");
    // Ask git where HEAD and the refs live: in a worktree `.git` is a file, and
    // watching a path that does not exist would rerun this script on every build.
    let git_dir = git(&["rev-parse", "--path-format=absolute", "--git-dir"]);
    let common = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]);
    if let (Some(git_dir), Some(common)) = (git_dir, common) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
        for p in ["refs", "packed-refs"] {
            let path = format!("{common}/{p}");
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
