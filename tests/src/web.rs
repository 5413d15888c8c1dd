//! The web side's build for the tests that run it (the SDK's Node tests, the browser
//! test): `buf generate` (web/gen), then `npm run build` (tsc strict over the SDK and the
//! pages, esbuild into web/sdk/dist and web/public/dist). Once per test process, whichever
//! test asks first, so two never write the same files at once.

use std::sync::OnceLock;

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// Builds the web side once; what went wrong, with the tool's output, if it did not.
pub fn build() -> Result<(), String> {
    BUILT
        .get_or_init(|| {
            let root = crate::deploy::repo_root();
            let web = root.join("web");
            let buf = root.join(".tools/node_modules/.bin/buf");
            for needed in [
                buf.clone(),
                web.join("node_modules/.bin/protoc-gen-es"),
                web.join("node_modules/.bin/esbuild"),
                web.join("node_modules/.bin/tsc"),
            ] {
                if !needed.exists() {
                    return Err(format!("{} is missing: run make deps", needed.display()));
                }
            }
            let run = |program: &std::path::Path, args: &[&str], dir: &std::path::Path| {
                let out = std::process::Command::new(program)
                    .args(args)
                    .current_dir(dir)
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{} {args:?} failed:\n{}{}",
                        program.display(),
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            };
            run(&buf, &["generate"], &root)?;
            run(std::path::Path::new("npm"), &["run", "--silent", "check"], &web)?;
            run(std::path::Path::new("npm"), &["run", "--silent", "build"], &web)
        })
        .clone()
}
