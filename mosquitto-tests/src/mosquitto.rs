//! Debian's Mosquitto programs as the tests run them: where they are (or how to install them),
//! and the arguments every `mosquitto_pub` and `mosquitto_sub` call here starts with.

use std::path::Path;
use std::process::Command;

/// `path` when that Mosquitto program is installed (a path that exists, or a name on `PATH`),
/// or an error that says how to install it.
pub fn tool(path: &str) -> Result<&str, String> {
    let name = Path::new(path).file_name().unwrap().to_string_lossy();
    let found = Path::new(path).is_file()
        || Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success());
    if found {
        Ok(path)
    } else {
        Err(format!(
            "{path} not found: install it with `apt-get install mosquitto mosquitto-clients` \
             (scripts/test does this on a fresh machine)"
        ))
    }
}

/// The arguments a Mosquitto client call starts with: the broker on loopback `port`, protocol
/// `version` (`mqttv311` or `mqttv5`), QoS 1.
pub fn client_args(port: u16, version: &str) -> Vec<String> {
    [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-V",
        version,
        "-q",
        "1",
    ]
    .map(String::from)
    .to_vec()
}
