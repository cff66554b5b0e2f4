//! The README's main job, run as a user would: `ambient-agent demo`, for
//! each capture backend and on loopback. Needs root for the namespace runs
//! (it fails with the demo's own message otherwise).

use std::process::Command;

fn demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ambient-agent"))
        .arg("demo")
        .args(args)
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo {args:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn check_namespace_demo(text: &str) {
    let (mesh, outside) = text
        .split_once("client -> outside")
        .expect("both connections reported");
    assert!(
        mesh.contains(
            "accepted it over HBONE from 10.1.1.2 proving spiffe://cluster.local/ns/demo/sa/client"
        ),
        "{text}"
    );
    assert!(
        mesh.contains("port(s) {15008}, plaintext visible: no"),
        "{text}"
    );
    assert!(
        outside.contains("port(s) {9090}, plaintext visible: YES"),
        "{text}"
    );
    assert!(text.contains("echoed back intact"), "{text}");
    // HTTP through the waypoint: L7 deny, header routing, a weighted split.
    assert!(
        text.contains("GET /admin/users (1): 1 x \"403 RBAC: access denied\""),
        "{text}"
    );
    assert!(
        text.contains("GET / with x-version: v2 (10): 10 x \"200 v2\""),
        "{text}"
    );
    let split = text
        .lines()
        .find(|l| l.contains("GET / (100):"))
        .unwrap_or_else(|| panic!("no weighted split in\n{text}"));
    assert!(
        split.contains("x \"200 v1\"") && split.contains("x \"200 v2\""),
        "{split}"
    );
    assert!(
        text.contains(
            "the waypoint handled 111 requests from spiffe://cluster.local/ns/demo/sa/client"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "accepted the reviews connections from spiffe://cluster.local/ns/demo/sa/waypoint"
        ),
        "{text}"
    );
}

#[test]
fn demo_with_nft_capture() {
    check_namespace_demo(&demo(&["--capture", "nft", "--bytes", "65536"]));
}

#[test]
fn demo_with_ebpf_capture() {
    check_namespace_demo(&demo(&["--capture", "ebpf", "--bytes", "65536"]));
}

#[test]
fn demo_on_loopback() {
    let text = demo(&["--loopback", "--bytes", "65536"]);
    assert_eq!(text.matches("intact (SHA-256 match)").count(), 3, "{text}");
    assert!(text.contains("encrypted: mTLS+HTTP/2 CONNECT"), "{text}");
}
