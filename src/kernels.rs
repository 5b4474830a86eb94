//! The CUDA kernel sources and the emulated device's sources, embedded by build.rs (see
//! kernels/README.md and kernels/emulator/README.md). Each op family's kernel files are in its folder
//! (src/ops/<family>/), the step runtime's in src/runtime/, the shared headers in kernels/.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Where kernel file `name` is in the repository (`kernels/NAME` for a name that is not embedded, as
/// a message about it reads best).
pub fn path_of(name: &str) -> String {
    SOURCE_PATHS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or_else(|| format!("kernels/{name}"), |(_, p)| p.to_string())
}
