//! Compiles every `src/bpf/*.bpf.c` into `$OUT_DIR/<name>.bpf.o` with clang
//! (`-target bpf -O2 -g`). Fails with the Debian package to install when the
//! compiler or a header is missing, rather than with a cryptic clang error.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// Headers the programs include, and the package that ships each.
const HEADERS: &[(&str, &str)] = &[
    ("bpf/bpf_helpers.h", "libbpf-dev"),
    ("linux/bpf.h", "linux-libc-dev"),
];

fn fail(msg: &str) -> ! {
    eprintln!(
        "\nerror: ambient-ebpf build: {msg}\n(see ebpf/README.md or run ebpf/install-deps.sh)\n"
    );
    exit(1);
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR is not set")));
    let src = manifest.join("src/bpf");
    println!("cargo:rerun-if-changed=src/bpf");
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => fail(&format!(
            "`{clang}` was not found or does not run: install the Debian packages `clang` and `llvm` \
             (apt-get install -y clang llvm), or set CLANG to a clang able to target bpf"
        )),
    }

    // asm/types.h and friends live under the multiarch directory on Debian.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "arm" => "arm-linux-gnueabihf",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        other => fail(&format!("unsupported target architecture {other}")),
    };
    let include_dirs = [
        Path::new("/usr/include").to_path_buf(),
        Path::new("/usr/include").join(multiarch),
    ];
    for (header, package) in HEADERS {
        if !include_dirs.iter().any(|d| d.join(header).is_file()) {
            fail(&format!(
                "header <{header}> is missing: install the Debian package `{package}`"
            ));
        }
    }
    if !include_dirs[1].join("asm/types.h").is_file() {
        fail(&format!(
            "header <asm/types.h> is missing under /usr/include/{multiarch}: install the Debian package `linux-libc-dev`"
        ));
    }

    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb",
        _ => "bpfel",
    };
    let entries = std::fs::read_dir(&src)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", src.display())));
    let mut sources: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    sources.sort();
    for source in sources {
        let name = source
            .file_name()
            .map(|n| n.to_string_lossy().replace(".bpf.c", ".bpf.o"));
        let Some(name) = name else { continue };
        let object = out.join(name);
        let status = Command::new(&clang)
            .args(["-target", target, "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I{}", include_dirs[1].display()))
            .arg(format!("-I{}", src.display()))
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .status()
            .unwrap_or_else(|e| fail(&format!("cannot run {clang}: {e}")));
        if !status.success() {
            fail(&format!("clang failed on {}", source.display()));
        }
    }
}
