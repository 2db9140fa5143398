//! `weft validate`: the same invalid mesh files the control plane rejects
//! (proxy/tests/config_rejection.rs) fail validation naming the document,
//! field and reason; valid files pass.

use std::path::Path;
use std::process::Command;

use weft_testkit::mesh::{bad_configs, split};

#[test]
fn weft_validate_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |file: &Path| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_weft")).arg("validate").arg(file).output().expect("run weft validate");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    for (i, (what, text, names)) in bad_configs().into_iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, text).unwrap();
        let (ok, out) = validate(&file);
        assert!(!ok, "{what}: weft validate accepted it:\n{out}");
        for n in names {
            assert!(out.contains(n), "{what}: output lacks {n:?}:\n{out}");
        }
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/canary.yaml");
    let (ok, out) = validate(&example);
    assert!(ok, "examples/canary.yaml: {out}");
    assert!(out.contains("valid"), "{out}");
    let (ok, out) = validate(&dir.path().join("good.yaml").with_extension("missing"));
    assert!(!ok, "{out}");
    std::fs::write(dir.path().join("good.yaml"), split(90, 10)).unwrap();
    let (ok, out) = validate(&dir.path().join("good.yaml"));
    assert!(ok, "{out}");
}
