//! `airlock-jailer`: not built yet (issue 5). The crate exists so the workspace has its final shape.

fn main() -> std::process::ExitCode {
    eprintln!("airlock-jailer: not implemented yet (issue 5)");
    std::process::ExitCode::from(2)
}
