//! Every shipped config in `config/` parses and validates; every fixture in
//! `tests/fixtures/config/invalid/` fails, naming a key.

use std::path::{Path, PathBuf};

use dlms_bridge::config;

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn shipped_configs_are_valid() {
    let files = toml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config"));
    assert!(files.len() >= 2, "expected config/*.toml, found {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        let raw = config::load_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        config::validate(raw).unwrap_or_else(|e| panic!("{}: {e:?}", f.display()));
    }
}

#[test]
fn invalid_fixtures_fail_with_a_key() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/invalid");
    let files = toml_files(&dir);
    assert!(
        files.len() >= 5,
        "expected invalid fixtures, found {files:?}"
    );
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        let msg = match config::load_str(&text) {
            Err(e) => e.to_string(),
            Ok(raw) => match config::validate(raw) {
                Ok(_) => panic!("{} validated but must fail", f.display()),
                Err(errs) => errs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        };
        // Every message names a dotted key path (`section.key` or `meters[0].key`).
        assert!(
            msg.contains('.') && msg.contains(':'),
            "{}: error does not name a key: {msg}",
            f.display()
        );
    }
}

#[test]
fn figment_parse_errors_name_the_key() {
    let e = config::load_str("[store]\nmax_age = \"forever\"\n").expect_err("bad duration");
    assert!(e.to_string().contains("store.max_age"), "{e}");
    let e = config::load_str("[thingsboard]\nacess_token = \"x\"\n").expect_err("unknown key");
    assert!(e.to_string().contains("acess_token"), "{e}");
    println!("{e}");
}

/// `import tb-gateway` recognises the unmodified packaged config by comparing with the text
/// embedded in the binary; that only works while the .deb installs exactly that file.
#[test]
fn the_deb_installs_the_config_the_binary_embeds() {
    let manifest: toml::Table =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .expect("Cargo.toml")
            .parse()
            .expect("Cargo.toml parses");
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("deb assets");
    let conf = assets
        .iter()
        .filter_map(|a| a.as_array())
        .find(|a| a.get(1).and_then(|d| d.as_str()) == Some("etc/dlms-bridge/config.toml"))
        .expect("config.toml is a deb asset");
    assert_eq!(conf[0].as_str(), Some("config/dlms-bridge.toml"));
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dlms-bridge.toml"),
    )
    .expect("read");
    assert_eq!(shipped, config::PACKAGED_DEFAULT);
}
