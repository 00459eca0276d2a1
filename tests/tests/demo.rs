//! The README's demo runs and its table agrees with the policy.

use std::process::Command;

use opmesh_tests::mesh::Binaries;

#[test]
fn the_demo_table_agrees_with_the_policy() -> anyhow::Result<()> {
    let bins = Binaries::locate()?;
    let demo = bins
        .manager
        .parent()
        .map(|d| d.join("opmesh-demo"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("opmesh-demo is not built; run `make test`"))?;
    let out = Command::new(demo).arg("--exit").output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("check: all 100 objects were handled by the subset the policy names: OK"),
        "{stdout}"
    );
    assert!(
        stdout.contains("handled by: operator-v1-0, operator-v1-1"),
        "{stdout}"
    );
    assert!(stdout.contains("subsets v1:2/2 v2:1/1"), "{stdout}");
    assert!(stdout.contains("ready True"), "{stdout}");
    assert!(stdout.contains("stopped."), "{stdout}");
    Ok(())
}
