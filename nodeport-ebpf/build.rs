/// Rebuild when the bpf-linker binary changes: cargo cannot express a dependency on a tool
/// (see aya-template's note on artifact dependencies), so its mtime stands in for it.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
