//! The bridge configuration the end-to-end tests start from: every listener on an ephemeral
//! loopback port, ThingsBoard (the emulator) on `tb_port` with `token`, fast reconnects, the
//! queue in `dir`, and `extra` TOML appended (meters, mappings, `[http]` tokens...).

use std::path::Path;

use dlms_bridge::config::{self, Config};

pub fn test_config(dir: &Path, tb_port: u16, token: &str, extra: &str) -> Config {
    // The HTTP server is on by default: never let a test bind the fixed 8484.
    let http = if extra.contains("[http]") {
        ""
    } else {
        "[http]\nlisten = \"127.0.0.1:0\"\n"
    };
    let toml = format!(
        r#"
[broker]
listen = "127.0.0.1:0"
{http}[thingsboard]
port = {tb_port}
access_token = "{token}"
reconnect_min = "50ms"
reconnect_max = "500ms"
[store]
path = "{}/queue.db"
[shutdown]
grace = "5s"
{extra}
"#,
        dir.display()
    );
    config::validate(config::load_str(&toml).expect("test config parses"))
        .expect("test config valid")
}
