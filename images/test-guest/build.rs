//! Adds the linker script when building the bare-metal guest. Host builds (used for
//! `cargo test`) link normally.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");
    if env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        let dir = env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo");
        println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
        // The target defaults to a static PIE, whose absolute pointers are left to a
        // runtime relocator we do not have. The image only ever runs at its link
        // address, so link it as a plain static executable.
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
