//! The `ktgt-operator` command line: the logging flag is the agent's (`--log-format`), and a
//! bad value is refused by name before anything starts.

use std::process::Command;

#[test]
fn log_format_is_the_agents_flag_and_bad_values_are_named() {
    let help = Command::new(env!("CARGO_BIN_EXE_ktgt-operator"))
        .arg("--help")
        .output()
        .expect("run ktgt-operator");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    assert!(text.contains("--log-format"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_ktgt-operator"))
        .args(["--log-format", "yaml"])
        .output()
        .expect("run ktgt-operator");
    assert!(!out.status.success(), "--log-format yaml accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--log-format") && err.contains("human") && err.contains("json"),
        "unhelpful error: {err}"
    );
}
