//! The images `deploy/images/build.sh` makes without a container engine:
//! each OCI archive names its image, runs as a non-root user, and its
//! entrypoint runs inside the unpacked root filesystem alone (`chroot`),
//! so nothing is borrowed from the machine that built it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use opmesh_tests::{control_plane::repo_root, mesh::Binaries};
use serde_json::Value;

const TAG: &str = "e2e-1";
const REGISTRY: &str = "registry.example.test/platform";

#[test]
fn each_image_archive_runs_its_entrypoint_in_its_own_root_filesystem() -> anyhow::Result<()> {
    let bins = Binaries::locate()?;
    let bin_dir = bins.manager.parent().context("binary dir")?;
    let out = tempfile::Builder::new()
        .prefix("opmesh-images-")
        .tempdir()?;
    let build = Command::new("bash")
        .arg(repo_root().join("deploy/images/build.sh"))
        .args(["--tag", TAG, "--registry", REGISTRY, "--bin-dir"])
        .arg(bin_dir)
        .arg("--out")
        .arg(out.path())
        .output()?;
    ensure!(
        build.status.success(),
        "deploy/images/build.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );

    let version = env!("CARGO_PKG_VERSION");
    for (image, binary) in [
        ("opmesh-manager", "opmesh-manager"),
        ("opmesh-runtime", "opmesh-runtime"),
        ("configmap-generator", "configmap_generator"),
    ] {
        let archive = out.path().join(format!("{image}-{TAG}.oci.tar"));
        let dir = out.path().join(image);
        let image = Unpacked::from_archive(&archive, &dir)
            .with_context(|| format!("unpacking {}", archive.display()))?;

        assert_eq!(
            image.annotation("io.containerd.image.name"),
            Some(format!("{REGISTRY}/{}:{TAG}", image_name(&archive)).as_str()),
            "{}: the name an import tags it with",
            archive.display()
        );
        assert_eq!(
            image.annotation("org.opencontainers.image.ref.name"),
            Some(TAG)
        );
        let config = &image.config["config"];
        assert_eq!(config["User"], "65532:65532", "{binary}: runs as non-root");
        assert_eq!(image.config["os"], "linux");
        assert_eq!(image.config["architecture"], "amd64");
        let entrypoint: Vec<String> = serde_json::from_value(config["Entrypoint"].clone())?;
        assert_eq!(entrypoint, [format!("/usr/local/bin/{binary}")]);
        assert_eq!(
            config["Labels"]["org.opencontainers.image.version"],
            version
        );
        // Small: no shell, no package manager, just the binary and what it
        // links.
        for absent in ["bin/sh", "usr/bin/apt", "bin/bash"] {
            assert!(
                !image.rootfs.join(absent).exists(),
                "{binary}: the image has /{absent}"
            );
        }

        // The entrypoint, as the image's user, with the unpacked layers as
        // the whole filesystem.
        let out = image.run_as_its_user(&[&entrypoint[0], "--version"])?;
        assert_eq!(
            out,
            format!("{binary} {version}\n"),
            "{binary}: --version inside its image"
        );
    }
    Ok(())
}

/// `configmap-generator` from `…/configmap-generator-e2e-1.oci.tar`.
fn image_name(archive: &Path) -> String {
    let file = archive.file_name().unwrap_or_default().to_string_lossy();
    file.trim_end_matches(&format!("-{TAG}.oci.tar"))
        .to_string()
}

/// An OCI image layout from an archive, with its one image's layers
/// applied in order to a root filesystem.
struct Unpacked {
    index: Value,
    config: Value,
    rootfs: PathBuf,
}

impl Unpacked {
    fn from_archive(archive: &Path, dir: &Path) -> anyhow::Result<Self> {
        let layout = dir.join("layout");
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&layout)?;
        std::fs::create_dir_all(&rootfs)?;
        tar(&[
            "-xf".as_ref(),
            archive.as_os_str(),
            "-C".as_ref(),
            layout.as_os_str(),
        ])?;
        let layout_version: Value = read_json(&layout.join("oci-layout"))?;
        ensure!(layout_version["imageLayoutVersion"] == "1.0.0");
        let index: Value = read_json(&layout.join("index.json"))?;
        let manifests = index["manifests"].as_array().context("index.manifests")?;
        ensure!(manifests.len() == 1, "one image per archive: {index}");
        let manifest: Value = read_json(&blob(&layout, &manifests[0]["digest"])?)?;
        ensure!(manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json");
        let config = read_json(&blob(&layout, &manifest["config"]["digest"])?)?;
        for layer in manifest["layers"].as_array().context("manifest.layers")? {
            let flag = match layer["mediaType"].as_str() {
                Some("application/vnd.oci.image.layer.v1.tar+gzip") => "-xzf",
                Some("application/vnd.oci.image.layer.v1.tar") => "-xf",
                other => bail!("unexpected layer media type {other:?}"),
            };
            let path = blob(&layout, &layer["digest"])?;
            tar(&[
                flag.as_ref(),
                path.as_os_str(),
                "-C".as_ref(),
                rootfs.as_os_str(),
            ])?;
        }
        Ok(Self {
            index,
            config,
            rootfs,
        })
    }

    fn annotation(&self, key: &str) -> Option<&str> {
        self.index["manifests"][0]["annotations"][key].as_str()
    }

    /// Runs `argv` with the root filesystem as `/`, as the image's user;
    /// returns its standard output.
    fn run_as_its_user(&self, argv: &[&str]) -> anyhow::Result<String> {
        let user = self.config["config"]["User"].as_str().unwrap_or("0:0");
        let id = Command::new("id").arg("-u").output()?;
        let root = String::from_utf8_lossy(&id.stdout).trim() == "0";
        let mut cmd = if root {
            let mut c = Command::new("chroot");
            c.arg(format!("--userspec={user}"));
            c
        } else {
            // A user namespace makes chroot possible without root; the
            // image's user is not mapped there, so run as its root.
            let mut c = Command::new("unshare");
            c.args(["--user", "--map-root-user", "chroot"]);
            c
        };
        let out = cmd
            .arg(&self.rootfs)
            .args(argv)
            .output()
            .context("running chroot")?;
        ensure!(
            out.status.success(),
            "{argv:?} in {}: {}\n{}",
            self.rootfs.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }
}

fn blob(layout: &Path, digest: &Value) -> anyhow::Result<PathBuf> {
    let digest = digest.as_str().context("digest")?;
    let (algorithm, hex) = digest.split_once(':').context("digest")?;
    Ok(layout.join("blobs").join(algorithm).join(hex))
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read(path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_slice(&text)?)
}

fn tar(args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let out = Command::new("tar").args(args).output()?;
    ensure!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
