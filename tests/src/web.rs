//! The clients generated from proto/ and the web side's build, for the tests that use them:
//! `buf generate` (buf.gen.yaml: JavaScript into web/gen, Python into gen/python), and
//! `npm run check` and `npm run build` (tsc strict over the SDK and the pages, esbuild into
//! web/sdk/dist and web/public/dist). Each once per test process, whichever test asks
//! first, so two never write the same files at once.

use std::path::Path;
use std::sync::OnceLock;

static GENERATED: OnceLock<Result<(), String>> = OnceLock::new();
static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Runs `program args` in `dir`; its output if it failed.
fn run(program: &Path, args: &[&str], dir: &Path) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{} {args:?} failed:\n{}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Every missing one of `paths`, as an error naming it.
fn present(paths: &[std::path::PathBuf]) -> Result<(), String> {
    match paths.iter().find(|p| !p.exists()) {
        Some(missing) => Err(format!("{} is missing: run make deps", missing.display())),
        None => Ok(()),
    }
}

/// `buf generate`, once; the Python clients are then in [`python_dir`].
pub fn generate() -> Result<(), String> {
    GENERATED
        .get_or_init(|| {
            let root = crate::deploy::repo_root();
            let buf = root.join(".tools/node_modules/.bin/buf");
            present(&[
                buf.clone(),
                root.join("web/node_modules/.bin/protoc-gen-es"),
            ])?;
            run(&buf, &["generate"], &root)
        })
        .clone()
}

/// Where `buf generate` puts the Python clients.
pub fn python_dir() -> std::path::PathBuf {
    crate::deploy::repo_root().join("gen/python")
}

/// [`generate`], then the SDK and the pages type-checked and built, once.
pub fn build() -> Result<(), String> {
    BUILT
        .get_or_init(|| {
            generate()?;
            let web = crate::deploy::repo_root().join("web");
            present(&[
                web.join("node_modules/.bin/esbuild"),
                web.join("node_modules/.bin/tsc"),
            ])?;
            let npm = Path::new("npm");
            run(npm, &["run", "--silent", "check"], &web)?;
            run(npm, &["run", "--silent", "build"], &web)
        })
        .clone()
}
