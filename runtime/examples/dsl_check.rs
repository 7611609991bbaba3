//! Checks agent definition files and prints their diagnostics, as `symbiont dsl check` does:
//! `cargo run -p symbiont-runtime --example dsl_check -- FILE...`. Exits 1 when a file has
//! errors.

fn main() {
    let mut failed = false;
    for path in std::env::args().skip(1) {
        match symbiont_runtime::dsl::check_file(std::path::Path::new(&path)) {
            Ok(def) => {
                print!("{}", def.warnings.render());
                println!(
                    "{path}: ok: agent `{}`, {} handler(s), {} policy statement(s)",
                    def.name,
                    def.handlers.len(),
                    def.policy.len()
                );
            }
            Err(diagnostics) => {
                failed = true;
                print!("{}", diagnostics.render());
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
