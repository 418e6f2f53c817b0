//! `airlockd`: not built yet (issue 7). The crate exists so the workspace has its final shape.

fn main() -> std::process::ExitCode {
    eprintln!("airlockd: not implemented yet (issue 7)");
    std::process::ExitCode::from(2)
}
