//! tollgate.wasm as an OCI image (`tollgate package`), in the form Istio's
//! `WasmPlugin` and Envoy Gateway's `EnvoyExtensionPolicy` pull with
//! `oci://`: an image manifest whose config is
//! `application/vnd.module.wasm.config.v1+json` and whose single layer is the
//! module (`application/vnd.module.wasm.content.layer.v1+wasm`, titled
//! `plugin.wasm`). Written as an OCI image layout directory and as a tarball
//! of that directory; push either with `oras` / `crane` / `skopeo`.

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::Path;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

/// Content address of a blob.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": digest(bytes), "size": bytes.len() })
}

fn annotated(
    mut descriptor: serde_json::Value,
    annotations: serde_json::Value,
) -> serde_json::Value {
    if let Some(d) = descriptor.as_object_mut() {
        d.insert("annotations".into(), annotations);
    }
    descriptor
}

/// A content-addressed blob: its digest and bytes.
pub type Blob = (String, Vec<u8>);

/// The blobs of the image (config, layer, manifest) and the manifest's
/// descriptor.
pub fn image(wasm: &[u8], tag: &str) -> Result<(Vec<Blob>, serde_json::Value)> {
    // Istio reads root_ids from the runtime config; Tollgate's root id is
    // "tollgate" (it must match the filter config's root_id).
    let config = serde_json::to_vec(
        &json!({ "type": "envoy_proxy", "abiVersions": ["v0-097b7f2e4cc1fb490cc1943d0d633655ac3c522f", "v0.2.1"], "rootIds": ["tollgate"] }),
    )?;
    let layer = annotated(
        descriptor(LAYER_MEDIA_TYPE, wasm),
        json!({ "org.opencontainers.image.title": "plugin.wasm" }),
    );
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config),
        "layers": [layer],
        "annotations": {
            "org.opencontainers.image.title": "tollgate",
            "org.opencontainers.image.version": tag,
            "org.opencontainers.image.description": "Tollgate proxy-wasm filter for Envoy: governs LLM API traffic",
        },
    }))?;
    let manifest_desc = annotated(
        descriptor(MANIFEST_MEDIA_TYPE, &manifest),
        json!({ "org.opencontainers.image.ref.name": tag }),
    );
    let blobs = vec![
        (digest(&config), config),
        (digest(wasm), wasm.to_vec()),
        (digest(&manifest), manifest),
    ];
    Ok((blobs, manifest_desc))
}

/// Writes the layout directory and `<out>.tar`; returns the manifest digest.
pub fn write(wasm: &[u8], tag: &str, out: &Path) -> Result<String> {
    let (blobs, manifest_desc) = image(wasm, tag)?;
    let manifest_digest = manifest_desc
        .get("digest")
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .to_string();
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("blobs/sha256"))?;
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        (
            "index.json".into(),
            serde_json::to_vec(
                &json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc] }),
            )?,
        ),
    ];
    for (d, bytes) in blobs {
        files.push((
            format!("blobs/sha256/{}", d.trim_start_matches("sha256:")),
            bytes,
        ));
    }
    let tar_path = out.with_extension("tar");
    let mut tar = tar::Builder::new(
        std::fs::File::create(&tar_path)
            .with_context(|| format!("writing {}", tar_path.display()))?,
    );
    for (name, bytes) in &files {
        std::fs::write(out.join(name), bytes)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes.as_slice())?;
    }
    tar.finish()?;
    Ok(manifest_digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn layout_and_tarball_read_back_with_matching_digests_and_media_types() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tollgate");
        let wasm = b"\0asm\x01\0\0\0fake module".to_vec();
        let manifest_digest = write(&wasm, "1.2.3", &out).unwrap();
        let blob = |d: &str| {
            std::fs::read(
                out.join("blobs/sha256")
                    .join(d.trim_start_matches("sha256:")),
            )
            .unwrap()
        };

        let layout: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("oci-layout")).unwrap()).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(m["digest"], manifest_digest.as_str());
        assert_eq!(
            m["annotations"]["org.opencontainers.image.ref.name"],
            "1.2.3"
        );
        let manifest_bytes = blob(&manifest_digest);
        assert_eq!(
            digest(&manifest_bytes),
            manifest_digest,
            "manifest blob is content-addressed"
        );
        assert_eq!(m["size"], manifest_bytes.len());
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        let config = blob(manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(
            digest(&config),
            manifest["config"]["digest"].as_str().unwrap()
        );
        let layer = &manifest["layers"][0];
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
        assert_eq!(layer["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(
            layer["annotations"]["org.opencontainers.image.title"],
            "plugin.wasm"
        );
        assert_eq!(layer["digest"], digest(&wasm).as_str());
        assert_eq!(blob(layer["digest"].as_str().unwrap()), wasm);

        // The tarball holds exactly the same files.
        let mut names = Vec::new();
        let mut archive =
            tar::Archive::new(std::fs::File::open(out.with_extension("tar")).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            assert_eq!(bytes, std::fs::read(out.join(&name)).unwrap(), "{name}");
            names.push(name);
        }
        names.sort();
        assert_eq!(names.len(), 5);
        assert_eq!(
            &names[..2],
            [
                "blobs/sha256/".to_string() + &names[0][13..],
                "blobs/sha256/".to_string() + &names[1][13..]
            ]
        );
        assert!(
            names.contains(&"index.json".to_string()) && names.contains(&"oci-layout".to_string())
        );
    }
}
