//! Builds the kernel half of the TURN offload (bpf/turn_offload.c) with clang, only when the
//! `kernel-offload` feature is on: the default build needs neither clang nor BPF headers.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=bpf/turn_offload.c");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    if std::env::var_os("CARGO_FEATURE_KERNEL_OFFLOAD").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
    // asm/types.h lives under the multiarch include directory, which `-target bpf` does not
    // search on its own.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "riscv64" => "riscv64-linux-gnu",
        other => other,
    };
    let status = Command::new(&clang)
        .args([
            "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-Wall", "-Werror",
        ])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", "bpf/turn_offload.c", "-o"])
        .arg(out.join("turn_offload.o"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} failed ({s}) on bpf/turn_offload.c"),
        Err(e) => panic!(
            "the kernel-offload feature needs clang and libbpf-dev (scripts/install-test-deps.sh \
             installs them): cannot run {clang}: {e}"
        ),
    }
}
