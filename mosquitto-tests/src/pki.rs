//! Certificates for TLS tests, made with Debian's `openssl`: a CA per name, server and client
//! certificates it signs, and their fingerprints as the registry pins them.

use std::path::Path;
use std::process::Command;

/// Runs openssl with `args` in `dir` (must succeed).
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's `openssl` package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` arguments that make a new P-256 key, unencrypted, written to `{name}.key`.
fn new_key(name: &str) -> Vec<String> {
    [
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([format!("{name}.key")])
    .collect()
}

/// Runs openssl with `args` then `more` in `dir` (must succeed).
fn openssl_with(dir: &Path, args: Vec<String>, more: &[&str]) {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(more);
    openssl(dir, &all);
}

/// A CA `{ca}.pem`/`{ca}.key`, and a certificate `{name}.pem`/`{name}.key` it signs with
/// subject CN `cn` and the extensions `ext` (a server's SAN, a client's usage); the CA is made
/// on first use.
pub fn issue(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    if !dir.join(format!("{ca}.pem")).exists() {
        openssl_with(
            dir,
            new_key(ca),
            &[
                "-x509",
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl_with(
        dir,
        new_key(name),
        &[
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

pub const SERVER_EXT: &str =
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
                          keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n";
pub const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";

/// The SHA-256 fingerprint of `{name}.pem` as the registry stores it (lowercase hex of the DER).
pub fn fingerprint(dir: &Path, name: &str) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(format!("{name}.pem"))
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.trim().rsplit('=').next().unwrap();
    hex.replace(':', "").to_lowercase()
}
