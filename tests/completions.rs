//! `replhub completions SHELL` and `replhub manpage`: generated from the clap definitions by the
//! real binary, so these check what an operator installs.
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run replhub")
}

/// Runs `args`, asserts success and an empty stderr, and returns stdout.
fn stdout_of(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?}: {out:?}");
    assert!(out.stderr.is_empty(), "{args:?} wrote to stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn bash_completion_knows_the_subcommands_and_serve_flags() {
    let script = stdout_of(&["completions", "bash"]);
    assert!(script.contains("_replhub()"), "defines the completion function");
    assert!(script.contains("complete -F _replhub"), "registers it for replhub");
    for word in [
        "serve",
        "tail",
        "loadtest",
        "completions",
        "manpage",
        "--upstream",
        "--synthetic",
        "--listen",
        "--metrics-listen",
        "--io",
        "--max-pending-bytes",
        "--write-timeout",
        "--config",
        "--connect",
    ] {
        assert!(script.contains(word), "bash completion mentions {word}");
    }
    // --io completes to its values.
    assert!(script.contains("auto uring epoll"), "bash completion lists the --io values");
}

#[test]
fn zsh_and_fish_completions_mention_serve() {
    let zsh = stdout_of(&["completions", "zsh"]);
    assert!(
        zsh.starts_with("#compdef replhub"),
        "zsh script starts with #compdef: {}",
        &zsh[..40.min(zsh.len())]
    );
    assert!(zsh.contains("serve") && zsh.contains("--upstream"), "zsh mentions serve and its flags");
    let fish = stdout_of(&["completions", "fish"]);
    assert!(fish.contains("complete -c replhub"), "fish script completes replhub");
    assert!(fish.contains("\"serve\"") && fish.contains("-l upstream"), "fish mentions serve and its flags");
}

#[test]
fn unknown_shell_is_a_usage_error() {
    let out = run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2: {out:?}");
    assert!(out.stdout.is_empty(), "no script on stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tcsh") && stderr.contains("bash"),
        "names the bad value and the choices: {stderr}"
    );
    let out = run(&["completions"]);
    assert_eq!(out.status.code(), Some(2), "the shell is required: {out:?}");
}

/// The first roff request of a page, past clap_mangen's string definitions (`.ie`/`.el`, which
/// define the apostrophe glyph before the title).
fn first_request(page: &str) -> &str {
    page.lines().find(|l| !l.starts_with(".ie ") && !l.starts_with(".el ")).unwrap_or_default()
}

#[test]
fn man_page_is_roff_with_the_subcommands() {
    let page = stdout_of(&["manpage"]);
    assert!(
        first_request(&page).starts_with(".TH replhub 1"),
        "the title comes first: {}",
        first_request(&page)
    );
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "has {section}");
    }
    assert!(page.contains("replhub\\-serve(1)") && page.contains("tail"), "lists the subcommands");
    assert_eq!(stdout_of(&["man"]), page, "`man` is an alias of `manpage`");
}

#[test]
fn man_pages_for_every_subcommand_go_into_a_directory() {
    let dir = std::env::temp_dir().join(format!("replhub-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let printed = stdout_of(&["manpage", "--dir", dir.to_str().expect("utf-8 path")]);
    assert!(printed.is_empty(), "--dir writes files, not stdout");
    let serve = std::fs::read_to_string(dir.join("replhub-serve.1")).expect("replhub-serve.1 written");
    assert!(first_request(&serve).starts_with(".TH replhub-serve 1"), "{}", first_request(&serve));
    for flag in ["upstream", "synthetic", "max\\-pending\\-bytes", "config"] {
        assert!(serve.contains(flag), "replhub-serve(1) documents --{flag}");
    }
    let top = std::fs::read_to_string(dir.join("replhub.1")).expect("replhub.1 written");
    assert_eq!(top, stdout_of(&["manpage"]), "the directory's replhub.1 is the printed page");
    assert!(dir.join("replhub-tail.1").is_file());
    std::fs::remove_dir_all(&dir).expect("clean up");
}
