//! `mqic`: see the library's module map in `lib.rs`.

fn main() -> std::process::ExitCode {
    mqic::cli::run()
}
