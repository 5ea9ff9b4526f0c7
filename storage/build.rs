//! `MESSINA_SKIP_SCYLLA_TESTS=1` compiles the tests that need a ScyllaDB node as ignored, so
//! `cargo test` lists them as "ignored" instead of passing them.
fn main() {
    println!("cargo::rerun-if-env-changed=MESSINA_SKIP_SCYLLA_TESTS");
    println!("cargo::rustc-check-cfg=cfg(messina_skip_scylla)");
    if std::env::var("MESSINA_SKIP_SCYLLA_TESTS").is_ok_and(|v| v == "1") {
        println!("cargo::rustc-cfg=messina_skip_scylla");
    }
}
