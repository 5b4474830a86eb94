//! The layers of docs/ARCHITECTURE.md, held against the code: every `crate::module` a file of src/
//! names is in its own layer or one below, and no modules name each other in a circle. A new import
//! that looks up, or a new module nobody placed, fails here with the file and the name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first (docs/ARCHITECTURE.md, "Layers"). A module may use its own layer's
/// modules and any below.
const LAYERS: &[&[&str]] = &[
    &["error", "float", "par", "kernels"],
    &["data", "multimnist"],
    &["backend"],
    &["cuda"],
    &["tape"],
    &["ops"],
    &["runtime", "config"],
    &["checkpoint", "prelude"],
    &["model", "dataset", "infer"],
    &["train"],
    &["predict", "figures", "serve", "bench"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of src/ belongs to (src/train/step.rs: train), or None for the crate
/// root and the binary.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy().to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// Every `crate::NAME` in `text` outside comments (and `crate::{A, B}` lists).
fn crate_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            if let Some(list) = after.strip_prefix('{') {
                let inner = list.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let head: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !head.is_empty() {
                        names.insert(head);
                    }
                }
            } else {
                let head: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !head.is_empty() {
                    names.insert(head);
                }
            }
            rest = after;
        }
    }
    names
}

#[test]
fn every_import_looks_down_and_no_modules_import_each_other_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    files.sort();
    let mut up = vec![];
    let mut unplaced = BTreeSet::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(module) = module_of(&src, f) else { continue };
        let Some(own) = layer_of(&module) else {
            unplaced.insert(module);
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for name in crate_names(&text) {
            // crate::Error, crate::Result, crate::bail! and the like are the crate root's re-exports
            let Some(theirs) = layer_of(&name) else { continue };
            if theirs > own {
                up.push(format!(
                    "{} ({module}, layer {own}) uses crate::{name} (layer {theirs})",
                    f.strip_prefix(&src).unwrap().display()
                ));
            }
            if name != module {
                edges.entry(module.clone()).or_default().insert(name);
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules in no layer of LAYERS (docs/ARCHITECTURE.md): {unplaced:?}"
    );
    assert!(up.is_empty(), "imports that look up a layer:\n{}", up.join("\n"));
    // a circle among the modules of one layer
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            return Some(path[i..].to_vec());
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(circle) = visit(n, &edges, &mut vec![], &mut done) {
            panic!("modules that import each other in a circle: {}", circle.join(" -> "));
        }
    }
}

/// The check can fail: an import up a layer and a circle are both seen.
#[test]
fn the_check_sees_an_import_up_a_layer() {
    let names =
        crate_names("use crate::train::{self, EvalReport};\nlet x = crate::{model, cuda::Foo}; // crate::figures\n");
    assert_eq!(
        names,
        ["cuda", "model", "train"]
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
    assert!(layer_of("backend").unwrap() < layer_of("train").unwrap());
    // the backend and the device know no op family; the ops know no training step
    assert!(layer_of("backend").unwrap() < layer_of("ops").unwrap());
    assert!(layer_of("cuda").unwrap() < layer_of("ops").unwrap());
    assert!(layer_of("ops").unwrap() < layer_of("runtime").unwrap());
    assert!(layer_of("no_such_module").is_none());
}

/// One op, one folder (docs/ARCHITECTURE.md, "Op families"): each family under src/ops/ declares its
/// interface in mod.rs, is implemented by the CPU reference, the fast CPU backend and the GPU in its own
/// cpu.rs, fast.rs and cuda.rs, and nowhere else, and holds its op tests (tests.rs) and kernel files.
#[test]
fn each_op_family_lives_in_its_own_folder() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut families: Vec<PathBuf> = std::fs::read_dir(src.join("ops"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    families.sort();
    assert!(families.len() >= 6, "op families: {families:?}");
    for dir in &families {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let m = std::fs::read_to_string(dir.join("mod.rs")).unwrap_or_else(|e| panic!("src/ops/{name}/mod.rs: {e}"));
        let iface = m
            .lines()
            .find_map(|l| l.strip_prefix("pub trait ").and_then(|r| r.split(':').next()))
            .unwrap_or_else(|| panic!("src/ops/{name}/mod.rs declares no interface (pub trait)"))
            .trim()
            .to_string();
        let implements = |text: &str| {
            text.lines()
                .any(|l| l.starts_with("impl") && l.contains(&format!(" {iface} for ")))
        };
        let tests = std::fs::read_to_string(dir.join("tests.rs"))
            .unwrap_or_else(|e| panic!("src/ops/{name}/tests.rs (the family's op tests): {e}"));
        assert!(tests.contains("#[test]"), "src/ops/{name}/tests.rs holds no test");
        assert!(
            m.contains("mod tests;"),
            "src/ops/{name}/mod.rs does not compile its tests.rs"
        );
        for backend in ["cpu.rs", "fast.rs", "cuda.rs"] {
            let text =
                std::fs::read_to_string(dir.join(backend)).unwrap_or_else(|e| panic!("src/ops/{name}/{backend}: {e}"));
            assert!(implements(&text), "src/ops/{name}/{backend} does not implement {iface}");
        }
        for f in &files {
            if !f.starts_with(dir) {
                let text = std::fs::read_to_string(f).unwrap();
                assert!(
                    !implements(&text),
                    "{} implements {iface}, which belongs in src/ops/{name}/",
                    f.display()
                );
            }
        }
        let kernels = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "cu"))
            .count();
        assert!(kernels > 0, "src/ops/{name}/ holds no kernel file");
    }
}
